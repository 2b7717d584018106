"""Sending tasks from a coroutine without blocking its loop: ``await aapply_async(...)``.

Celery's ``apply_async`` publishes synchronously: a round trip to the broker,
and with a broker that refuses connections, Celery's whole retry policy, on
the calling thread. Here the same call runs on a bounded thread pool
(``offload``) while the coroutine awaits it, with every option Celery takes
(routing, headers, ETA and countdown, link and link_error, any signature or
canvas), because it is Celery's own call. In a task the message carries that
task as its parent, as ``apply_async`` from the task would.

The calling thread never holds a producer or a lock across an ``await``: the
whole publish, producer pool and all, runs on the pool's thread.
"""

from __future__ import annotations

from typing import Any

from celery import Task
from celery.canvas import Signature
from celery.result import AsyncResult

from . import offload


async def aapply_async(target: Signature | Task[Any, Any], args: Any = None,
                       kwargs: Any = None, **options: Any) -> AsyncResult[Any]:
    """``target.apply_async(args, kwargs, **options)``, awaited: a task, a signature or a canvas.

    Raises:
        TypeError: ``target`` is neither a task nor a signature.
        Whatever ``apply_async`` raises (``OperationalError`` once the broker
        has refused for Celery's whole retry policy), in the awaiting coroutine.
    """
    if isinstance(target, Signature):
        result: AsyncResult[Any] = await offload.call(target.apply_async, args or (),
                                                      kwargs or {}, **options)
        return result
    if isinstance(target, Task):
        sent: AsyncResult[Any] = await offload.call(target.apply_async, args, kwargs, **options)
        return sent
    raise TypeError(f"aapply_async() sends a task or a signature (chain, group, chord...), "
                    f"not {type(target).__name__}")


async def aretry(task: Task[Any, Any], *args: Any, **kwargs: Any) -> Any:
    """``task.retry(...)``, awaited: publishes the retry off the loop, then raises ``Retry``.

    With ``throw=False`` the ``Retry`` is returned instead, as ``retry`` does.
    """
    return await offload.call(task.retry, *args, **kwargs)
