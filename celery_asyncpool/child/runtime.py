"""The per-process runtime: one event loop for the life of the process, and the bridge to it.

Invariants: the loop is created before any user code in the process can bind
to it and is never replaced; coroutines reach it only through ``Runtime.run``
(or, in a slot-aware child, through the job server that drives it: ``server``);
it is stopped once, by ``Runtime.stop``, after its engines are disposed on it.

A worker child drives its loop from its main thread (``server`` serves the
parent's jobs there), so an async task costs no hop between threads: measured
on 2 vCPUs, a round trip to a loop on another thread cost about 150 us of
CPU, 7% of a no-op task. Eager mode keeps the loop on a thread of its own,
because its caller may already be running another loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded

from .. import _compat, hooks
from ..config import Settings, new_event_loop
from ..context import caller_context
from ..databases.engines import Databases, Sizing
from ..errors import BridgeError, TaskCancelledError
from ..wire import CANCEL_MESSAGES, SOFT

logger = logging.getLogger(__name__)

T = TypeVar("T")

SOFT_LIMIT_MESSAGE = CANCEL_MESSAGES[SOFT]
# How often a thread waiting on the loop wakes, so that an exception raised in it
# (the soft time limit, ``_compat.set_async_exc``) arrives while it waits.
WAIT_SLICE_S = 0.05


class _Handoff:
    """One coroutine handed to the loop from another thread, and the future that thread waits on."""

    __slots__ = ("coro", "done", "loop", "task")

    def __init__(self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.coro = coro
        self.loop = loop
        self.done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        if self.done.done():
            return  # cancelled before it started
        self.task = self.loop.create_task(self.coro)
        self.task.add_done_callback(self._finish)

    def cancel(self, message: str) -> None:
        """Cancel the coroutine at its ``await``; on the loop, so before or after ``start``."""
        if self.task is not None:
            self.task.cancel(message)
        elif not self.done.done():
            self.coro.close()
            self.done.set_exception(asyncio.CancelledError(message))

    def _finish(self, task: asyncio.Task[Any]) -> None:
        try:
            self.done.set_result(task.result())
        except BaseException as exc:  # the coroutine's own outcome, handed over as is
            self.done.set_exception(exc)


class Runtime:
    """One event loop for the life of the process, and its databases.

    With ``own_thread`` (eager mode) the loop runs forever on a thread of its
    own and ``run`` blocks until the coroutine is done there. Without it (a
    worker child) ``run`` drives the loop on the calling thread while nothing
    else does (start-up, shutdown); while the job server drives it, ``run``
    from another thread (a sync task) hands the coroutine over and waits.
    """

    def __init__(self, settings: Settings, sizing: Sizing, *, name: str = "asyncsql-loop",
                 own_thread: bool = True, worker: str | None = None) -> None:
        self.settings = settings
        self.sizing = sizing
        self.worker = worker  # the node name its connections carry
        self.loop = new_event_loop(settings.loop)
        self.databases: Databases | None = None
        # Awaited on the loop as it closes, after the jobs' leftovers and before the engines.
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self._thread = (threading.Thread(target=self._serve, name=name, daemon=True)
                        if own_thread else None)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_loop_thread(self) -> bool:
        """Whether the calling thread is inside the loop, where it must ``await`` instead."""
        return _compat.running_loop() is self.loop

    def start(self, *, run_hooks: bool = True) -> None:
        """Start the loop, then open it: see ``start_loop`` and ``open``."""
        self.start_loop()
        self.open(run_hooks=run_hooks)

    def start_loop(self) -> None:
        """Start the loop's own thread, if it has one; the loop serves until ``stop``."""
        if self._thread is not None:
            self._thread.start()

    def open(self, *, run_hooks: bool = True) -> None:
        """Build the engines on the loop, then run the ``on_child_start`` hooks there.

        Raises:
            ChildStartError: a hook failed or timed out.
        """
        self.run(self._open(run_hooks))

    async def _open(self, run_hooks: bool) -> None:
        self.databases = Databases(self.settings, self.sizing, self.worker)
        if run_hooks:
            await hooks.run_start_hooks(self.settings.hook_timeout_s)

    def stop(self, *, run_hooks: bool = True) -> None:
        """Run the stop hooks, dispose the engines on their loop, stop and close it.

        Bounded: each hook by ``asyncsql_hook_timeout_s``, the rest by
        ``asyncsql_cancel_grace_s``; what does not finish in time is abandoned.
        """
        if self.loop.is_closed() or (self._thread is not None and not self._thread.is_alive()):
            return
        try:
            self.run(self._close(run_hooks))
        except BaseException:
            logger.exception("Closing the asyncsql runtime failed")
        finally:
            if self._thread is None:
                self.loop.close()
            else:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(self.settings.cancel_grace_s)
                if not self._thread.is_alive():
                    self.loop.close()

    async def _close(self, run_hooks: bool) -> None:
        if run_hooks:
            await hooks.run_stop_hooks(self.settings.hook_timeout_s)
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for leftover in leftovers:
            leftover.cancel("the asyncsql child is stopping")
        if leftovers:
            await asyncio.wait(leftovers, timeout=self.settings.cancel_grace_s)
        for close in self.closers:
            try:
                await asyncio.wait_for(close(), self.settings.cancel_grace_s)
            except Exception:
                logger.exception("Closing the asyncsql runtime: %r failed", close)
        if self.databases is not None:
            await asyncio.wait_for(self.databases.aclose(), self.settings.cancel_grace_s)
        await self.loop.shutdown_asyncgens()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result, from outside the loop.

        The coroutine sees the caller's context, so ``task.request`` and
        ``current_task`` resolve to the caller's task. Celery's soft time
        limit, or an exception raised in the waiting thread (``SystemExit``
        when the child is terminated), cancels the coroutine at its current
        ``await`` with a message naming the cause.

        Raises:
            BridgeError: when called on the loop's own thread (``await`` instead).
            TaskCancelledError: the coroutine was cancelled by something else.
        """
        if self.on_loop_thread():
            coro.close()
            raise BridgeError(
                "A coroutine task body cannot be run to completion on the asyncsql "
                "event loop it would need: await the coroutine instead.")
        if self._thread is None and not self.loop.is_running():
            return self._run_here(coro)
        job = _Handoff(coro, self.loop)
        try:  # from before the hand-over: an interrupt may land as soon as it is made
            self.loop.call_soon_threadsafe(job.start, context=caller_context())
            error = _wait(job.done)
        except BaseException as interrupt:
            return self._interrupted(job, interrupt)  # type: ignore[no-any-return]
        if isinstance(error, asyncio.CancelledError):
            raise TaskCancelledError(
                f"The coroutine was cancelled by something other than the pool: {error}"
            ) from error
        return job.done.result()  # type: ignore[no-any-return]

    def _interrupted(self, job: _Handoff, interrupt: BaseException) -> Any:
        """Cancel the coroutine because the waiting thread was interrupted, and settle.

        For a soft time limit the coroutine may handle the ``CancelledError``:
        whatever it then returns or raises is the task's outcome, as when a
        sync task catches ``SoftTimeLimitExceeded``; if the cancellation
        escapes, ``SoftTimeLimitExceeded`` is raised. Any other interrupt is
        re-raised once the coroutine has unwound or ``asyncsql_cancel_grace_s``
        has passed.
        """
        soft = isinstance(interrupt, SoftTimeLimitExceeded)
        message = SOFT_LIMIT_MESSAGE if soft else _interrupt_message(interrupt)
        self.loop.call_soon_threadsafe(job.cancel, message)
        try:
            error = job.done.exception(timeout=None if soft else self.settings.cancel_grace_s)
        except concurrent.futures.TimeoutError:
            logger.warning("A coroutine did not finish within %ss of being cancelled (%s)",
                           self.settings.cancel_grace_s, message)
            raise interrupt from None
        if not soft or isinstance(error, asyncio.CancelledError):
            raise interrupt
        return job.done.result()

    def _run_here(self, coro: Coroutine[Any, Any, T]) -> T:
        """Drive the loop on this thread until ``coro`` is done."""
        task = self.loop.create_task(coro, context=caller_context())
        try:
            return self.loop.run_until_complete(task)
        except asyncio.CancelledError as error:
            raise TaskCancelledError(
                f"The coroutine was cancelled by something other than the pool: {error}"
            ) from error
        except BaseException as interrupt:  # SystemExit on terminate, from a signal handler
            self._unwind(task, interrupt)
            raise

    def _unwind(self, task: asyncio.Task[Any], interrupt: BaseException) -> None:
        """Cancel ``task`` and let it unwind, within ``asyncsql_cancel_grace_s``."""
        if task.done():
            return
        task.cancel(_interrupt_message(interrupt))
        try:
            self.loop.run_until_complete(
                asyncio.wait([task], timeout=self.settings.cancel_grace_s))
        except BaseException:
            logger.warning("A coroutine did not unwind after %s", _interrupt_message(interrupt))
        if not task.done():
            logger.warning("A coroutine did not finish within %ss of being cancelled (%s)",
                           self.settings.cancel_grace_s, _interrupt_message(interrupt))


def _wait(done: concurrent.futures.Future[Any]) -> BaseException | None:
    """``done``'s exception once it is done, waking every ``WAIT_SLICE_S``.

    A lock wait in C defers an exception raised in this thread from another
    (a sync task's soft time limit) until the wait ends; slices let it in.
    """
    while True:
        try:
            return done.exception(timeout=WAIT_SLICE_S)
        except concurrent.futures.TimeoutError:
            continue


def _interrupt_message(interrupt: BaseException) -> str:
    return f"celery_asyncpool: {type(interrupt).__name__} in the child"
