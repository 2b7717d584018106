"""The bridge from Celery's tracer to an ``async def`` task body, installed in each child.

In a worker child Celery's tracer calls ``task.run`` (or ``task.__call__``,
which calls ``self.run``). Giving each ``async def`` task an instance
attribute ``run`` that hands the coroutine to the loop and waits changes what
the tracer executes without changing the tracer.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _compat, context
from . import tracer

if TYPE_CHECKING:
    from celery import Celery, Task

    from .runtime import Runtime


def body_attribute(task: Task[Any, Any]) -> str | None:
    """The attribute holding the task's ``async def`` body, or None for a sync task.

    Celery's ``autoretry_for`` replaces ``run`` with a sync wrapper that calls
    the body it keeps aside; bridging that keeps autoretry working.
    """
    for attribute in (_compat.AUTORETRY_BODY, "run"):
        if inspect.iscoroutinefunction(getattr(task, attribute, None)):
            return attribute
    return None


def async_tasks(app: Celery) -> dict[str, tuple[Task[Any, Any], str]]:
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
        _compat.rebuild_tracer(name, task, app, hostname)
    return frozenset(found)


def _bridge(body: Callable[..., Any], runtime: Runtime) -> Callable[..., Any]:
    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> Any:
        if tracer.in_tracer():
            return tracer.await_body(body(*args, **kwargs))  # a slot-aware child's job
        if runtime.on_loop_thread():
            return body(*args, **kwargs)  # awaited by the coroutine that called it
        return runtime.run(body(*args, **kwargs))
    # wraps() copied a __signature__ the body's function may carry, which still names its
    # ``self``; Task.retry(args=..., kwargs=...) binds the request's arguments to this one.
    with contextlib.suppress(TypeError, ValueError):
        run.__signature__ = inspect.signature(body)  # type: ignore[attr-defined]
    return run
