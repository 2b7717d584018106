"""The job server: runs the jobs the parent sends, many at once, on the child's loop.

The parent (``parent.supervisor``) sends JOB, CANCEL and STOP down one pipe;
the server answers with ACK, READY, DRAINING and STATS up the other
(``wire``; ``process`` sends UP and BYE around it).

An async job's tracer runs in a greenlet on the loop thread and its body as a
Task of its own (``tracer``), so a CANCEL hits that one body. Sync jobs run
one at a time on a thread of their own (``sync_thread``), never on the loop;
of the CANCEL reasons only the soft time limit reaches them. While jobs are
served, a ``watchdog`` thread warns when the loop stops running, naming the
job whose Task blocks it.

Invariants: every job read from the pipe is run and gets one READY, a job
read after DRAINING or STOP too; its ACK comes first, when it starts; the
serve loop ends only when no job is in flight.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import WorkerLostError
from celery.utils.serialization import UnpickleableExceptionWrapper

from .. import _compat, wire
from ..wire import ACK, CANCEL, CANCEL_MESSAGES, CANCEL_REASONS, DRAINING, JOB, READY, SOFT, \
    STATS, STATS_INTERVAL_S, STOP, task_label
from . import tracer as tracers
from .sync_thread import Outcome, SyncThread
from .watchdog import Watchdog

if TYPE_CHECKING:
    from .runtime import Runtime

logger = logging.getLogger(__name__)


class ReportPipe:
    """The pipe up to the parent; once the parent has gone, reports are dropped."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False
        self._lock = threading.Lock()  # the loop watchdog's thread reports too

    def send(self, message: tuple[Any, ...]) -> None:
        self.write(wire.encode(message))

    def write(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            with self._lock:
                wire.write_all(self.fd, data)
        except OSError as exc:
            self.broken = True
            logger.warning("The report pipe to the parent is broken (%s): this child finishes "
                           "its jobs without reporting them, then exits.", exc)


class RunningJob:
    """One job read from the pipe: its tracer call, and for an async task the tracer greenlet."""

    __slots__ = ("call", "id", "runner", "tracer")

    def __init__(self, job_id: int, call: functools.partial[Outcome], is_async: bool) -> None:
        self.id = job_id
        self.call = call
        self.tracer = tracers.Tracer(call) if is_async else None
        self.runner: asyncio.Task[None] | None = None  # held: the loop keeps Tasks weakly


class JobServer:
    """Runs the jobs read from ``job_fd`` on the running loop and reports on each.

    ``async_tasks`` names the tasks whose bodies are bridged coroutines; the
    tracer of any other job runs on the sync thread.
    """

    def __init__(self, runtime: Runtime, async_tasks: frozenset[str], slots: int, job_fd: int,
                 reports: ReportPipe, *, max_tasks: int | None = None,
                 max_memory_kb: int | None = None) -> None:
        self._runtime = runtime
        self._loop = runtime.loop
        self._async_tasks = async_tasks
        self._slots = slots
        self._job_fd = job_fd
        self._reports = reports
        self._max_tasks = max_tasks
        self._max_memory_kb = max_memory_kb
        self._pid = os.getpid()
        self._loop_lag_s = 0.0  # how late the last stats timer fired: the loop's lag
        self._decoder = wire.Decoder()
        self._jobs: dict[int, RunningJob] = {}
        self._sync = SyncThread()
        self._finished = 0
        self._leaving: str | None = None
        self._idle = asyncio.Event()

    async def serve(self) -> None:
        """Serve jobs until STOP, draining or EOF on the job pipe, and none is in flight."""
        os.set_blocking(self._job_fd, False)
        self._loop.add_reader(self._job_fd, self._read_jobs)
        stats = self._loop.create_task(self._report_stats())
        watchdog = self._start_watchdog()
        try:
            while True:
                await self._idle.wait()
                self._read_jobs()  # a last look: jobs sent before the parent read DRAINING
                if not self._jobs:
                    return
                self._idle.clear()
        finally:
            self._loop.remove_reader(self._job_fd)
            stats.cancel()
            self._sync.close()
            if watchdog is not None:
                watchdog.stop()

    def snapshot(self) -> dict[str, Any]:
        """Jobs in flight and engine pool use, JSON-friendly (for ``inspect stats``)."""
        databases = self._runtime.databases
        engines = {} if databases is None else {
            name: _pool_use(engine.pool) for name, engine in databases.engines.items()}
        return {"pid": self._pid, "slots": self._slots, "in_flight": len(self._jobs),
                "engines": engines, "loop_lag_s": round(self._loop_lag_s, 4)}

    def _start_watchdog(self) -> Watchdog | None:
        threshold_s = self._runtime.settings.loop_block_warning_s
        if threshold_s is None:
            return None
        watchdog = Watchdog(self._loop, threshold_s, self._describe, self._report_blocked)
        watchdog.start()
        return watchdog

    def _report_blocked(self, blocked: bool) -> None:
        """From the watchdog's thread: tell the parent to send no new job while blocked."""
        self._reports.send((wire.BLOCKED, blocked))

    def _describe(self, running: asyncio.Task[Any] | None) -> str:
        """The job whose Task ``running`` is (its tracer's or its body's), for the watchdog.

        Called from the watchdog's thread while the loop is blocked.
        """
        for job in list(self._jobs.values()):  # list(): one step, safe from another thread
            if running is not None and running in (job.runner, getattr(job.tracer, "body", None)):
                return f"task {task_label(job.call.args)} (job {job.id})"
        return f"no task of this child ({running!r})"

    # --- messages from the parent ---------------------------------------------------------

    def _read_jobs(self) -> None:
        messages = wire.read_available(self._job_fd, self._decoder)
        if messages is None:
            self._loop.remove_reader(self._job_fd)
            self._leave("the parent closed the job pipe")
            return
        for message in messages:
            kind, fields = message[0], message[1:]
            if kind == JOB:
                self._start(*fields)
            elif kind == CANCEL:
                self._cancel(*fields)
            elif kind == STOP:
                self._leave("the parent asked it to stop")
            else:
                logger.error("Ignored a message of unknown kind %r from the parent; expected "
                             "%s, %s or %s.", kind, JOB, CANCEL, STOP)

    def _start(self, job_id: int, target: Callable[..., Outcome], args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> None:
        if len(self._jobs) >= self._slots:
            logger.warning("Job %s arrived while all %d slot(s) of this child were busy: "
                           "running it anyway. The parent must send at most %d at once.",
                           job_id, self._slots, self._slots)
        is_async = bool(args) and args[0] in self._async_tasks  # args[0]: the task's name
        job = RunningJob(job_id, functools.partial(target, *args, **kwargs), is_async)
        self._jobs[job_id] = job
        if is_async:
            self._ack(job_id, time.monotonic())
        job.runner = self._loop.create_task(self._run(job))

    def _cancel(self, job_id: int, reason: str) -> None:
        job = self._jobs.get(job_id)
        if reason not in CANCEL_REASONS:
            logger.error("Ignored CANCEL of job %s with reason %r; expected one of %s.",
                         job_id, reason, ", ".join(CANCEL_REASONS))
        elif job is None:
            logger.debug("Ignored CANCEL (%s) of job %s: it is not running here.", reason, job_id)
        elif job.tracer is not None:
            job.tracer.cancel(reason)
            if reason != SOFT:  # a soft limit the body may handle, and go on
                self._loop.call_later(self._runtime.settings.cancel_grace_s,
                                      self._warn_if_swallowed, job, reason)
        elif not (reason == SOFT and self._sync.interrupt(job_id)):
            logger.debug("Sync job %s cannot be cancelled (%s) while it runs or waits here; "
                         "the parent kills this child if it must.", job_id, reason)

    def _warn_if_swallowed(self, job: RunningJob, reason: str) -> None:
        """Name a body still running ``asyncsql_cancel_grace_s`` after it was cancelled.

        This runs on the loop, so the loop runs: the body caught the
        ``CancelledError`` and went on. The parent kills this child once its
        other jobs are done.
        """
        body = None if job.tracer is None else job.tracer.body
        if self._jobs.get(job.id) is job and body is not None and not body.done():
            logger.error(
                "Task %s still runs %ss after it was cancelled (%s): its coroutine swallowed "
                "asyncio.CancelledError. Re-raise it (catch Exception, not BaseException, and "
                "re-raise CancelledError after any clean-up). This child takes no new jobs "
                "and is replaced once its other jobs are done.",
                task_label(job.call.args), self._runtime.settings.cancel_grace_s,
                CANCEL_MESSAGES[reason])

    # --- running a job --------------------------------------------------------------------

    async def _run(self, job: RunningJob) -> None:
        try:
            if job.tracer is not None:
                outcome = await tracers.drive(job.tracer, self._runtime.settings.cancel_grace_s)
            else:
                outcome = await self._sync.run(job.id, job.call, self._ack_from_thread)
        except BaseException as exc:  # past Celery's tracer, which reports the task's own errors
            logger.error("Job %s raised %r outside Celery's tracer", job.id, exc, exc_info=True)
            outcome = _failure(exc)
            if not isinstance(exc, Exception):
                self._drain(f"a job raised {exc!r}")
        if outcome[0]:
            _hint_unpicklable(job, outcome[1])
        self._finish(job, outcome)

    def _ack(self, job_id: int, started: float) -> None:
        self._send((ACK, job_id, self._pid, started))

    def _ack_from_thread(self, job_id: int, started: float) -> None:
        self._loop.call_soon_threadsafe(self._ack, job_id, started)  # reports go from the loop

    def _finish(self, job: RunningJob, outcome: Outcome) -> None:
        del self._jobs[job.id]
        self._finished += 1
        if self._leaving is None:
            reason = self._drain_reason()
            if reason is not None:
                # Before READY: the parent must not give the freed slot a new job.
                self._drain(reason)
        self._ready(job.id, outcome)
        if self._leaving is not None and not self._jobs:
            self._idle.set()

    def _ready(self, job_id: int, outcome: Outcome) -> None:
        try:
            data = wire.encode((READY, job_id, outcome))
        except Exception as exc:
            logger.error("The outcome of job %s cannot be pickled for the parent (%r): "
                         "reporting the job as failed.", job_id, exc)
            error = _compat.maybe_encoding_error(exc, outcome)
            data = wire.encode((READY, job_id, _failure(error)))
        self._write(data)

    # --- leaving --------------------------------------------------------------------------

    def _drain_reason(self) -> str | None:
        if self._max_tasks and self._finished >= self._max_tasks:
            return f"max_tasks_per_child reached ({self._finished} tasks)"
        if self._max_memory_kb:
            used_kb = _rss_kb()
            if used_kb > self._max_memory_kb:
                return (f"max_memory_per_child exceeded ({used_kb} KiB used, "
                        f"{self._max_memory_kb} KiB allowed)")
        return None

    def _drain(self, reason: str) -> None:
        if self._leaving is None:
            self._send((DRAINING, reason))
            self._leave(reason)

    def _leave(self, reason: str) -> None:
        """Take the way out: jobs in flight (and any still sent) finish, then ``serve`` returns."""
        if self._leaving is None:
            self._leaving = reason
            logger.info("asyncsql child %s leaves once its %d job(s) in flight are done: %s",
                        self._pid, len(self._jobs), reason)
            self._send((STATS, self.snapshot()))
        if not self._jobs:
            self._idle.set()

    async def _report_stats(self) -> None:
        while True:
            started = self._loop.time()
            await asyncio.sleep(STATS_INTERVAL_S)
            self._loop_lag_s = max(0.0, self._loop.time() - started - STATS_INTERVAL_S)
            self._send((STATS, self.snapshot()))

    def _send(self, message: tuple[Any, ...]) -> None:
        self._write(wire.encode(message))

    def _write(self, data: bytes) -> None:
        self._reports.write(data)
        if self._reports.broken:
            self._leave("the parent closed the report pipe")


def _hint_unpicklable(job: RunningJob, einfo: Any) -> None:
    """Say what to fix when Celery's tracer stored a task's exception in its pickleable wrapper."""
    wrapper = getattr(einfo, "exception", None)
    if isinstance(wrapper, UnpickleableExceptionWrapper):
        logger.warning(
            "Task %s raised %s.%s, an exception that cannot be pickled: it is stored as "
            "UnpickleableExceptionWrapper (%s), as on prefork. Make it picklable: pass every "
            "argument of its __init__ on to super().__init__(), or give it a __reduce__.",
            task_label(job.call.args), wrapper.exc_module, wrapper.exc_cls_name,
            getattr(wrapper, "text", ""))


def _failure(exc: BaseException) -> tuple[int, ExceptionInfo, float]:
    """A failure shaped as Celery's tracer returns one, for an error it did not report itself.

    ``SystemExit`` and ``KeyboardInterrupt`` become ``WorkerLostError``, as
    prefork reports them; Celery's ``Request.on_success`` would re-raise them
    in the worker.
    """
    if not isinstance(exc, Exception):
        exc = WorkerLostError(f"The job raised {exc!r} in the asyncsql child.")
    try:
        raise exc  # ExceptionInfo needs a traceback, which a new exception lacks
    except Exception:
        return 1, ExceptionInfo(), 0.0


def _pool_use(pool: Any) -> dict[str, int | None]:
    """Connections of an engine's pool, and the tasks waiting for one; None for a count its
    class does not keep (NullPool)."""
    counts = {"size": "size", "checked_out": "checkedout", "checked_in": "checkedin",
              "overflow": "overflow"}
    use = {key: _count(pool, method) for key, method in counts.items()}
    use["waiters"] = getattr(pool, "waiters", None)  # engines.waiter_counting's
    if use["overflow"] is not None:
        use["overflow"] = max(0, use["overflow"])  # QueuePool counts up from -pool_size
    return use


def _count(pool: Any, method: str) -> int | None:
    counter = getattr(pool, method, None)
    return int(counter()) if callable(counter) else None


def _rss_kb() -> int:
    """This process's resident memory now, in KiB (billiard's fallback gives the peak)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak, where no /proc
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024
