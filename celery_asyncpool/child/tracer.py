"""Celery's tracer in a greenlet on the loop thread, and its wait for a coroutine task body.

A slot-aware child (``server``) runs each async job's tracer in a ``Tracer``
greenlet on the loop's own thread: no hop between threads per task. When the
tracer calls the task body, the bridge (``bridge._bridge``) calls
``await_body``, which switches back to ``drive``; ``drive`` runs the coroutine
as an asyncio Task of its own and switches back with its result or exception.
Cancelling that Task (time limit, revoke, shutdown) hits the body alone, never
the tracer's own result handling.

The tracer's own I/O (storing the result, Celery's chord step, publishing
links) is handed over the same way by ``await_io``, but as an ``IOWait``:
``drive`` awaits it as is, so a cancel for a time limit or a revoke never
interrupts a store half-written; it hits the body alone.

The shape is SQLAlchemy's ``greenlet_spawn``/``await_``
(sqlalchemy/util/concurrency.py), whose private helpers we do not import.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from celery.exceptions import Ignore, SoftTimeLimitExceeded
from greenlet import getcurrent, greenlet  # type: ignore[import-untyped]

from ..context import caller_context
from ..errors import TaskCancelledError
from ..wire import CANCEL_MESSAGES, HARD, REVOKE, SHUTDOWN, SOFT, task_label
from . import leftovers

T = TypeVar("T")


class Tracer(greenlet):  # type: ignore[misc]
    """One job's tracer, run to its end by ``drive`` on the loop thread.

    Its context is a copy of its creator's, as an asyncio Task's is. There
    ``context._caller`` is unset, so Celery's stacks key this job's request by
    this greenlet, and ``await_body`` hands that identity to the body's Task.
    """

    def __init__(self, run: functools.partial[Any]) -> None:
        super().__init__(run, getcurrent())
        self.call = run  # greenlet forgets ``run`` once started
        self.gr_context = contextvars.copy_context()
        self.body: asyncio.Task[Any] | None = None
        self.cancel_reason: str | None = None

    @property
    def label(self) -> str:
        """``name[id]`` of the job's task."""
        return task_label(self.call.args)

    def cancel(self, reason: str) -> None:
        """Cancel the body's Task now, or as soon as it starts; ``reason`` is a CANCEL reason."""
        self.cancel_reason = reason
        if self.body is not None:
            self.body.cancel(CANCEL_MESSAGES[reason])


class IOWait:
    """An awaitable of the tracer's own I/O, handed to ``drive`` by ``await_io``."""

    __slots__ = ("coro",)

    def __init__(self, coro: Awaitable[Any]) -> None:
        self.coro = coro


def in_tracer() -> bool:
    """Whether the caller runs in a ``Tracer``, where it must use ``await_body``."""
    return isinstance(getcurrent(), Tracer)


async def drive(tracer: Tracer, grace_s: float) -> Any:
    """Run ``tracer`` to its end and return what it returns.

    Each coroutine it hands over in ``await_body`` runs as a Task of its own;
    its result or exception, as the tracer must see it, is switched back in
    once what the body left behind is cleaned up (``leftovers.clean_up``,
    which gives pending Tasks ``grace_s`` to unwind).
    """
    request = tracer.switch()
    while not tracer.dead:
        if isinstance(request, IOWait):
            request = await _wait_for_io(tracer, request.coro)
            continue
        coro, context = request
        left = leftovers.watch(context)
        body = tracer.body = asyncio.get_running_loop().create_task(coro, context=context)
        if tracer.cancel_reason is not None:
            body.cancel(CANCEL_MESSAGES[tracer.cancel_reason])
        value, error = None, None
        try:
            value = await body
        except BaseException as exc:
            error = exc
        tracer.body = None
        if left.tasks or left.sessions:
            await leftovers.clean_up(left, tracer.label, grace_s,
                                     cancel_tasks=tracer.cancel_reason is None)
        error = _as_seen_by_tracer(tracer.cancel_reason, error)
        if error is None:
            request = tracer.switch(value)
        else:
            request = tracer.throw(type(error), error, error.__traceback__)
    return request


def await_body(coro: Coroutine[Any, Any, T]) -> T:
    """Wait, in a ``Tracer``, for the task body's coroutine, and return its result.

    Raises:
        SoftTimeLimitExceeded: the body was cancelled for its soft time limit
            and did not handle the cancellation.
        Ignore: it was cancelled for a hard limit, a revoke or a shutdown,
            whatever it did then: the tracer stores nothing, the parent
            settles the job.
        TaskCancelledError: it was cancelled by something other than the pool.
    """
    return getcurrent().parent.switch((coro, caller_context()))  # type: ignore[no-any-return]


def await_io(coro: Awaitable[T]) -> T:
    """Wait, in a ``Tracer``, for ``coro`` on the loop: the tracer's own I/O, never cancelled.

    Its result or exception is the tracer's, unchanged.
    """
    return getcurrent().parent.switch(IOWait(coro))  # type: ignore[no-any-return]


async def _wait_for_io(tracer: Tracer, coro: Awaitable[Any]) -> Any:
    """Run ``coro``, then switch its outcome back into ``tracer``; return its next request."""
    try:
        value = await coro
    except BaseException as error:
        return tracer.throw(type(error), error, error.__traceback__)
    return tracer.switch(value)


def _as_seen_by_tracer(reason: str | None, error: BaseException | None) -> BaseException | None:
    """What the tracer gets instead of the body's outcome, if anything; ``reason``: the cancel's."""
    seen = error
    if reason in (HARD, REVOKE, SHUTDOWN):
        seen = Ignore(CANCEL_MESSAGES[reason])
    elif isinstance(error, asyncio.CancelledError):
        seen = SoftTimeLimitExceeded() if reason == SOFT else TaskCancelledError(
            f"The coroutine was cancelled by something other than the pool: {error}")
    return seen
