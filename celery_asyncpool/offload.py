"""Celery's blocking calls run on threads of their own while a coroutine awaits them.

Publishing a message (py-amqp or redis-py) and what stays Celery's code in a
result backend (a chord's part return, a read) block the thread that calls
them. Here they run on a bounded thread pool instead of the event loop, in a
copy of the caller's context, so ``task.request`` and ``current_task``
resolve to the caller's task there (``context``).

Two rules keep this safe with Celery's code: the thread holds any producer it
acquires and any lock it takes from start to end (nothing on the loop holds a
producer or a lock across an ``await``), and the pool is bounded, so a broker
that hangs ties up threads, never the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .context import caller_context

T = TypeVar("T")

THREADS = 8  # per process; a publish or a chord step holds one for a round trip or two

_lock = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def executor() -> concurrent.futures.ThreadPoolExecutor:
    """This process's thread pool for Celery's blocking calls, made on first use."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=THREADS, thread_name_prefix="asyncsql-celery-io")
        return _executor


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """``fn(*args, **kwargs)`` started on the pool now, to be awaited on the running loop.

    It sees the caller's task as current: the caller's context is taken here,
    where the caller runs (a coroutine, or a tracer greenlet on the loop's
    thread), not where the future is awaited.
    """
    context = caller_context()
    return asyncio.get_running_loop().run_in_executor(
        executor(), functools.partial(context.run, fn, *args, **kwargs))


def shutdown() -> None:
    """Let the pool's threads finish what they run, then end them (a child's tear-down)."""
    global _executor
    with _lock:
        pool, _executor = _executor, None
    if pool is not None:
        pool.shutdown(wait=True)


def _forget_after_fork() -> None:
    global _executor, _lock
    _executor, _lock = None, threading.Lock()  # the parent's threads did not fork


os.register_at_fork(after_in_child=_forget_after_fork)
