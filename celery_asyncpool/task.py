"""``AsyncTask``: ``async def`` bodies run to completion eagerly, and refused by other pools.

In a worker child the bodies are bridged onto the child's loop
(``celery_asyncpool.child.bridge``); here is what the task side needs
elsewhere: eager mode and ``apply()`` on a helper loop, and a clear error from
a pool that cannot run them.
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
from celery.result import AsyncResult

from . import context, publish
from .child.bridge import async_tasks
from .child.runtime import Runtime
from .config import Settings
from .databases.engines import Sizing
from .errors import BridgeError

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)


# Task is Any without celery-types (an ignored subclass of Any); with them, the ignore is unused.
class AsyncTask(Task[Any, Any]):  # type: ignore[misc, unused-ignore]
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

    async def aapply_async(self, args: Any = None, kwargs: Any = None,
                           **options: Any) -> AsyncResult[Any]:
        """``apply_async``, awaited: the publish runs on a thread, the loop keeps running."""
        return await publish.aapply_async(self, args, kwargs, **options)

    async def adelay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """``delay``, awaited: ``await task.adelay(1, 2)``."""
        return await publish.aapply_async(self, args, kwargs)

    async def aretry(self, *args: Any, **kwargs: Any) -> Any:
        """``retry``, awaited: ``await self.aretry(exc=exc, countdown=5)`` raises ``Retry``.

        The same arguments as ``retry``; the retry's publish runs on a thread.
        """
        return await publish.aretry(self, *args, **kwargs)


_eager_lock = threading.Lock()
_eager: dict[Celery, Runtime] = {}


def eager_runtime(app: Celery) -> Runtime:
    """``app``'s helper loop for eager async bodies in this process, started on first use.

    It builds engines from ``app``'s settings (SQLAlchemy's own pool sizes),
    runs the ``on_child_start`` hooks, and is stopped at interpreter exit.

    Raises:
        BridgeError: when called from that helper loop itself (``await`` instead).
    """
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
    # In a worker no task returns a coroutine (asyncsql bridges them, other pools
    # refuse them), so keep the eager-mode check off every task's path there.
    signals.task_postrun.disconnect(_on_task_postrun)
    pool_cls = getattr(sender, "pool_cls", None)
    if isinstance(pool_cls, type) and not getattr(pool_cls, "runs_coroutines", False):
        refuse_async_tasks(sender.app, pool_cls.__module__.rsplit(".", 1)[-1])


def _on_task_postrun(sender: Any = None, retval: Any = None, **_: Any) -> None:
    if inspect.iscoroutine(retval):
        logger.error(
            "Task %s returned a coroutine instead of running it: declare it with "
            "@app.task(base=celery_asyncpool.AsyncTask) for eager mode and apply(), "
            "and run workers with -P asyncsql.", getattr(sender, "name", sender))


signals.worker_init.connect(_on_worker_init, weak=False)
signals.task_postrun.connect(_on_task_postrun, weak=False)
