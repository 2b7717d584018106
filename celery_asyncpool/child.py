"""The per-process runtime: one event loop for the life of the process, and the bridge to it.

Invariants: the loop is created before any user code in the process can bind
to it and is never replaced; coroutines reach it only through ``Runtime.run``;
it is stopped once, by ``Runtime.stop``, after its engines are disposed on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from celery.exceptions import SoftTimeLimitExceeded

from . import hooks
from .config import Settings
from .context import caller_context
from .database import Databases, Sizing
from .errors import BridgeError, TaskCancelledError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Job:
    """One coroutine handed to the loop, and the future its caller waits on."""

    __slots__ = ("coro", "done", "loop", "task")

    def __init__(self, coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.coro = coro
        self.loop = loop
        self.done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        self.task = self.loop.create_task(self.coro)
        self.task.add_done_callback(self._finish)

    def cancel(self, message: str) -> None:
        if self.task is not None:
            self.task.cancel(message)

    def _finish(self, task: asyncio.Task[Any]) -> None:
        try:
            self.done.set_result(task.result())
        except BaseException as exc:  # the coroutine's own outcome, handed over as is
            self.done.set_exception(exc)


class Runtime:
    """An event loop running forever on a thread of its own, and its databases.

    Code on other threads runs coroutines there with ``run``, which blocks; the
    loop thread itself must ``await`` instead.
    """

    def __init__(self, settings: Settings, sizing: Sizing, *, name: str = "asyncsql-loop") -> None:
        self.settings = settings
        self.sizing = sizing
        self.loop = asyncio.new_event_loop()
        self.databases: Databases | None = None
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread.ident

    def start(self, *, run_hooks: bool = True) -> None:
        """Start the loop, then open it: see ``start_loop`` and ``open``."""
        self.start_loop()
        self.open(run_hooks=run_hooks)

    def start_loop(self) -> None:
        """Start the loop's thread; the loop runs until ``stop``."""
        self._thread.start()

    def open(self, *, run_hooks: bool = True) -> None:
        """Build the engines on the loop, then run the ``on_child_start`` hooks there.

        Raises:
            ChildStartError: a hook failed or timed out.
        """
        self.run(self._open(run_hooks))

    async def _open(self, run_hooks: bool) -> None:
        self.databases = Databases(self.settings, self.sizing)
        if run_hooks:
            await hooks.run_start_hooks(self.settings.hook_timeout_s)

    def stop(self, *, run_hooks: bool = True) -> None:
        """Run the stop hooks, dispose the engines on their loop, stop and close it.

        Bounded: each hook by ``asyncsql_hook_timeout_s``, the rest by
        ``asyncsql_cancel_grace_s``; what does not finish in time is abandoned.
        """
        if not self._thread.is_alive():
            return
        try:
            self.run(self._close(run_hooks))
        except BaseException:
            logger.exception("Closing the asyncsql runtime failed")
        finally:
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
        if self.databases is not None:
            await asyncio.wait_for(self.databases.aclose(), self.settings.cancel_grace_s)
        await self.loop.shutdown_asyncgens()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and return its result, from a thread that is not the loop's.

        The coroutine sees the caller's context, so ``task.request`` and
        ``current_task`` resolve to the caller's task. An exception raised in
        the waiting thread (Celery's soft time limit, ``SystemExit`` when the
        child is terminated) cancels the coroutine at its current ``await``
        with a message naming the cause, see ``_interrupted``.

        Raises:
            BridgeError: when called on the loop's own thread (``await`` instead).
            TaskCancelledError: the coroutine was cancelled by something else.
        """
        if self.on_loop_thread():
            coro.close()
            raise BridgeError(
                "A coroutine task body cannot be run to completion on the asyncsql "
                "event loop it would need: await the coroutine instead.")
        job = _Job(coro, self.loop)
        self.loop.call_soon_threadsafe(job.start, context=caller_context())
        try:
            error = job.done.exception()
        except BaseException as interrupt:
            return self._interrupted(job, interrupt)  # type: ignore[no-any-return]
        if isinstance(error, asyncio.CancelledError):
            raise TaskCancelledError(
                f"The coroutine was cancelled by something other than the pool: {error}"
            ) from error
        return job.done.result()  # type: ignore[no-any-return]

    def _interrupted(self, job: _Job, interrupt: BaseException) -> Any:
        """Cancel the coroutine because the waiting thread was interrupted, and settle.

        For a soft time limit the coroutine may handle the ``CancelledError``:
        whatever it then returns or raises is the task's outcome, as when a
        sync task catches ``SoftTimeLimitExceeded``; if the cancellation
        escapes, ``SoftTimeLimitExceeded`` is raised. Any other interrupt is
        re-raised once the coroutine has unwound or ``asyncsql_cancel_grace_s``
        has passed.
        """
        soft = isinstance(interrupt, SoftTimeLimitExceeded)
        cause = "soft time limit exceeded" if soft else f"{type(interrupt).__name__} in the child"
        self.loop.call_soon_threadsafe(job.cancel, f"celery_asyncpool: {cause}")
        try:
            error = job.done.exception(timeout=None if soft else self.settings.cancel_grace_s)
        except concurrent.futures.TimeoutError:
            logger.warning("A coroutine did not finish within %ss of being cancelled (%s)",
                           self.settings.cancel_grace_s, cause)
            raise interrupt from None
        if not soft or isinstance(error, asyncio.CancelledError):
            raise interrupt
        return job.done.result()
