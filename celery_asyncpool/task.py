"""Async task bodies: bridged onto the child's loop, and run to completion eagerly.

In a worker child Celery's tracer calls ``task.run`` (or ``task.__call__``,
which calls ``self.run``). Giving each ``async def`` task an instance
attribute ``run`` that hands the coroutine to the loop and waits changes what
the tracer executes without changing the tracer.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Task, signals
from celery.app.trace import build_tracer

from . import context, greenlets
from .config import Settings
from .database import Sizing
from .errors import BridgeError

if TYPE_CHECKING:
    from celery import Celery

    from .child import Runtime

logger = logging.getLogger(__name__)


def body_attribute(task: Task) -> str | None:
    """The attribute holding the task's ``async def`` body, or None for a sync task.

    Celery's ``autoretry_for`` replaces ``run`` with a sync wrapper that calls
    the body kept as ``_orig_run``; bridging that keeps autoretry working.
    """
    for attribute in ("_orig_run", "run"):
        if inspect.iscoroutinefunction(getattr(task, attribute, None)):
            return attribute
    return None


def async_tasks(app: Celery) -> dict[str, tuple[Task, str]]:
    """Each async task by name, with the attribute holding its body."""
    found = {}
    for name, task in app.tasks.items():
        attribute = body_attribute(task)
        if attribute is not None:
            found[name] = (task, attribute)
    return found


def install_bridges(app: Celery, runtime: Runtime, hostname: str) -> frozenset[str]:
    """Make every async task body run on ``runtime``'s loop when Celery's tracer calls it.

    Returns the names of the tasks bridged: afterwards ``body_attribute`` no
    longer sees them as async, their bodies being the bridge.
    """
    context.install(app)
    found = async_tasks(app)
    for name, (task, attribute) in found.items():
        setattr(task, attribute, _bridge(getattr(task, attribute), runtime))
        task.__trace__ = build_tracer(name, task, app.loader, hostname, app=app)
    return frozenset(found)


def _bridge(body: Callable[..., Any], runtime: Runtime) -> Callable[..., Any]:
    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> Any:
        if greenlets.in_tracer():
            return greenlets.await_body(body(*args, **kwargs))  # a slot-aware child's job
        if runtime.on_loop_thread():
            return body(*args, **kwargs)  # awaited by the coroutine that called it
        return runtime.run(body(*args, **kwargs))
    return run


class AsyncTask(Task):  # type: ignore[misc]
    """Task base whose ``async def`` bodies also finish under ``apply()`` and eager mode.

    ``Celery(..., task_cls="celery_asyncpool:AsyncTask")`` or
    ``@app.task(base=AsyncTask)``. Eagerly the coroutine runs on a helper
    thread's loop with its own engines, so it also works where another event
    loop is already running. Calling the task directly (``task(1)``) still
    returns the coroutine, to be awaited.
    """

    abstract = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = super().__call__(*args, **kwargs)
        if inspect.iscoroutine(result) and self.request.is_eager:
            return eager_runtime(self.app).run(result)
        return result


_eager_lock = threading.Lock()
_eager: dict[Celery, Runtime] = {}


def eager_runtime(app: Celery) -> Runtime:
    """``app``'s helper loop for eager async bodies in this process, started on first use.

    It builds engines from ``app``'s settings (SQLAlchemy's own pool sizes),
    runs the ``on_child_start`` hooks, and is stopped at interpreter exit.

    Raises:
        BridgeError: when called from that helper loop itself (``await`` instead).
    """
    from .child import Runtime

    with _eager_lock:
        runtime = _eager.get(app)
        if runtime is None:
            settings = Settings.from_conf(app.conf)
            runtime = Runtime(settings, Sizing(None, 1, settings.connection_cap),
                              name="asyncsql-eager")
            runtime.start()
            atexit.register(runtime.stop)
            _eager[app] = runtime
        # Every call, not only the first: tasks registered since must see
        # their own request on the helper loop too.
        context.install(app)
    if runtime.on_loop_thread():
        raise BridgeError(
            "An eager async task was applied from inside another eager async task: "
            "await the task's coroutine (call the task directly) instead of apply().")
    return runtime


def _forget_eager_runtimes() -> None:
    _eager.clear()


os.register_at_fork(after_in_child=_forget_eager_runtimes)


def refuse_async_tasks(app: Celery, pool_name: str) -> None:
    """Fail each async task with an error saying to use ``-P asyncsql``.

    Without this, another pool would store a coroutine or fail it with an
    ``EncodeError`` whose message does not say what to do.
    """
    found = async_tasks(app)
    if not found:
        return
    logger.error("Tasks %s are async def, which the %r pool cannot run: start the worker "
                 "with -P asyncsql.", ", ".join(found), pool_name)
    for task, attribute in found.values():
        setattr(task, attribute, _refusal(getattr(task, attribute), task.name, pool_name))


def _refusal(body: Callable[..., Any], name: str, pool_name: str) -> Callable[..., Any]:
    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> Any:
        raise BridgeError(
            f"Task {name!r} is async def, which the {pool_name!r} pool cannot run; start "
            "the worker with -P asyncsql (or worker_pool = 'asyncsql').")
    return run


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    from .pool import TaskPool

    # In a worker no task returns a coroutine (asyncsql bridges them, other pools
    # refuse them), so keep the eager-mode check off every task's path there.
    signals.task_postrun.disconnect(_on_task_postrun)
    pool_cls = getattr(sender, "pool_cls", None)
    if isinstance(pool_cls, type) and not issubclass(pool_cls, TaskPool):
        refuse_async_tasks(sender.app, pool_cls.__module__.rsplit(".", 1)[-1])


def _on_task_postrun(sender: Any = None, retval: Any = None, **_: Any) -> None:
    if inspect.iscoroutine(retval):
        logger.error(
            "Task %s returned a coroutine instead of running it: declare it with "
            "@app.task(base=celery_asyncpool.AsyncTask) for eager mode and apply(), "
            "and run workers with -P asyncsql.", getattr(sender, "name", sender))


signals.worker_init.connect(_on_worker_init, weak=False)
signals.task_postrun.connect(_on_task_postrun, weak=False)
