"""Celery's own I/O in an async job's tracer, kept off the child's loop.

The tracer of an async job runs in a greenlet on the loop's thread
(``tracer``); whatever it does synchronously stops every sibling coroutine of
the child. So, on the child's result backend and ``app.amqp``, for calls made
from a tracer:

- a state write on a Redis backend (SUCCESS, FAILURE, RETRY, STARTED) is
  ``results.ResultStore``'s one script call, awaited on the loop through
  ``redis.asyncio``; ``result_backend_always_retry``'s waits are awaited;
- a chord's part return, the read that de-duplicates a redelivered task, a
  failure's errbacks and the publish of link callbacks and the next chain step
  stay Celery's code, run on a thread (``offload``) while the tracer waits.

Called from anywhere else (a sync task's thread, a coroutine) they are
Celery's, unchanged. Other result backends keep Celery's code throughout.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import _compat, offload, results
from . import tracer

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

# The backend's methods that stay Celery's code, run off the loop from a tracer.
OFF_LOOP = ("on_chord_part_return", "get_task_meta", _compat.CALL_ERRBACKS)


class CeleryIO:
    """What ``install`` changed in one child, closed with its loop."""

    def __init__(self, writer: results.AsyncWriter | None) -> None:
        self.writer = writer

    async def aclose(self) -> None:
        """Close the result backend's asyncio client; on the loop, before it closes."""
        if self.writer is not None:
            await self.writer.aclose()


def install(app: Celery) -> CeleryIO:
    """Keep Celery's I/O in async jobs' tracers off this child's loop; call on the loop's thread.

    The backend changed is the one the tracers use: ``app.backend`` of the
    loop's thread (Celery keeps one per thread).
    """
    _make_producer_pool(app)
    backend = app.backend
    writer = None
    store = results.install(backend)
    if store is not None:
        candidate = results.AsyncWriter(store)
        try:
            candidate.client()  # made now, connected at the first write: odd set-ups fail here
        except ValueError as exc:
            logger.warning("Results are stored with Celery's own Redis client, off the "
                           "loop: %s.", exc)
        else:
            writer = store.writer = candidate
            store.in_tracer, store.await_io = tracer.in_tracer, tracer.await_io
        results.sleep_in(backend, tracer.in_tracer, tracer.await_io)
    for name in OFF_LOOP:
        _off_loop(backend, name)
    _off_loop(app.amqp, _compat.RETRY_PUBLISH)
    return CeleryIO(writer)


def _make_producer_pool(app: Celery) -> None:
    """Make the child's producer pool now, on one thread, before any publish.

    Made first by several ``offload`` threads at once, Celery sizes it twice:
    one thread takes a producer from it at kombu's default limit, another then
    shrinks it to ``broker_pool_limit`` and kombu raises "Can't shrink pool
    when in use" in that thread's task. Making it is lazy: nothing connects.
    """
    app.amqp.producer_pool  # noqa: B018 (the property makes and sizes it)


def _off_loop(owner: Any, name: str) -> None:
    """Make ``owner.name`` run on an ``offload`` thread when a tracer calls it."""
    method: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        if tracer.in_tracer():
            return tracer.await_io(offload.call(method, *args, **kwargs))
        return method(*args, **kwargs)
    setattr(owner, name, call)
