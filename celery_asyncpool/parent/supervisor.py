"""The parent's side of the slot-aware pool: children, the jobs each runs, dispatch and timers.

Invariants: a job is in at most one place (the waiting queue, or one child's
``jobs``); each job is settled exactly once (``Job.settle``), which releases
the worker's semaphore once; no child ever holds more jobs than its slots;
a replacement child starts only after the child it replaces has exited, so
the connection budget is never exceeded.

All of it runs on one thread: the worker's kombu hub, or, for a transport
without one, the supervisor's own thread (``driver.LoopDriver``), with a lock
around what the consumer's thread calls. Every entry point is marked
``@_entry``, so ``busy_here()`` tells a signal handler (Celery's cold
shutdown) that it interrupted the supervisor mid-step.

``tests/unit/test_supervisor_states.py`` drives it as a state machine and
checks these invariants after every step.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from billiard.einfo import ExceptionInfo
from billiard.exceptions import Terminated, WorkerLostError

from .. import wire
from ..wire import ACK, BLOCKED, BYE, CANCEL, DRAINING, HARD, JOB, READY, REVOKE, SHUTDOWN, \
    SOFT, STATS, STATS_INTERVAL_S, STOP, UP, task_label

logger = logging.getLogger(__name__)

# A child whose loop has not reported for this long is taken as blocked.
LOOP_SILENT_S = 3 * STATS_INTERVAL_S

Callback = Callable[..., Any]
F = TypeVar("F", bound=Callable[..., Any])


def _entry(method: F) -> F:
    """Mark a way in from the hub or the consumer, for ``Supervisor.busy_here``."""
    @functools.wraps(method)
    def entered(self: Supervisor, *args: Any, **kwargs: Any) -> Any:
        self._depth.value = getattr(self._depth, "value", 0) + 1
        try:
            return method(self, *args, **kwargs)
        finally:
            self._depth.value -= 1
    return entered  # type: ignore[return-value]


class Job:
    """One task handed to the pool: Celery's callbacks, its timers, the child running it.

    Celery keeps a weak reference to it and calls ``terminate(signum)`` on
    ``revoke(terminate=True)``.
    """

    def __init__(self, supervisor: Supervisor, job_id: int, target: Callback,
                 args: Any, kwargs: Any, options: dict[str, Any]) -> None:
        self.supervisor = supervisor
        self.id = job_id
        self.message = wire.encode((JOB, job_id, target, tuple(args), dict(kwargs)))
        self.callback: Callback | None = options.get("callback")
        self.error_callback: Callback | None = options.get("error_callback")
        self.accept_callback: Callback | None = options.get("accept_callback")
        self.timeout_callback: Callback | None = options.get("timeout_callback")
        self.soft_timeout: float | None = options.get("soft_timeout")
        self.timeout: float | None = options.get("timeout")
        self.correlation_id = options.get("correlation_id")
        self.task = tuple(args[:2])  # (name, id), to name the task in the log
        self.task_id = self.task[1] if len(self.task) > 1 else None
        self.child: ChildProcess | None = None
        self.accepted = False
        self.settled = False
        self.timers: list[Any] = []
        self.deadlines: list[tuple[float, Callback]] = []

    def terminate(self, signum: int | None = None) -> None:
        """Cancel this job from the loop, as prefork's kill is seen there, not now.

        Celery calls this from inside its handlers. On a broker connection loss,
        a slot freed now would go to a request Celery is about to discard and the
        broker redelivers, and the task would run twice.
        """
        self.supervisor.later(0, self.supervisor.revoke, self, signum or signal.SIGTERM)

    def settle(self, outcome: Any = None, error: BaseException | None = None,
               notify: bool = True) -> None:
        """Hand the outcome to Celery, once: the tracer's return, or an error made here.

        ``notify=False`` only releases the slot, for an outcome Celery is told of
        another way (the hard time limit's ``timeout_callback``).
        """
        if self.settled:
            return
        self.settled = True
        self.cancel_timers()
        self.supervisor.release_slot()
        if self.supervisor.on_outcome is not None and self.task:
            ended = outcome if error is None and outcome is not None else (1, error, None)
            self.supervisor.on_outcome(str(self.task[0]), ended)
        if not notify:
            return
        try:
            if error is None:
                if self.callback is not None:
                    self.callback(outcome)
            elif self.error_callback is not None:
                self.error_callback(_exception_info(error))
        except Exception:
            logger.exception("Handling the outcome of job %s failed", self.correlation_id)

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
        self.deadlines.clear()


def _exception_info(error: BaseException) -> ExceptionInfo:
    try:
        raise error
    except BaseException:
        return ExceptionInfo()


class ChildProcess:
    """One child: its process, its two pipes, its slots and the jobs it runs now.

    ``max_jobs`` (``worker_max_tasks_per_child``) counts the jobs sent to it, in
    flight included, so with many slots it still runs at most that many.
    """

    def __init__(self, index: int, process: Any, job_fd: int, report_fd: int, slots: int,
                 max_jobs: int | None = None) -> None:
        self.index = index
        self.process = process
        self.pid: int = process.pid
        self.job_fd = job_fd
        self.report_fd = report_fd
        self.slots = slots
        self.jobs: dict[int, Job] = {}
        self.max_jobs = max_jobs
        self.sent = 0  # jobs ever sent to it
        self.retired = False  # stopped by a shrink: not replaced when it exits
        self.decoder = wire.Decoder()
        self.outbox = bytearray()
        self.up = False
        self.draining = False
        self.stuck = False  # runs a cancelled job that will not end: killed once it runs no other
        self.blocked = False  # its loop watchdog says the loop does not run: no new jobs
        self.gone = False
        self.stats: dict[str, Any] = {}
        self.stats_at: float | None = None

    @property
    def free_slots(self) -> int:
        if not self.up or self.draining or self.gone or self.blocked:
            return 0
        free = self.slots - len(self.jobs)
        return free if self.max_jobs is None else min(free, self.max_jobs - self.sent)

    @property
    def spent(self) -> bool:
        """Sent its ``max_jobs``: it takes no more and leaves once they are done."""
        return self.max_jobs is not None and self.sent >= self.max_jobs

    def kill(self) -> None:
        """SIGKILL the child; its exit is then seen through its sentinel."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Supervisor:
    """Starts children, dispatches jobs to the least-loaded one, settles each job once.

    ``spawn(index)`` makes a child process and returns ``(process, job_fd,
    report_fd)``; ``driver`` gives readers, writers and timers (the hub's, or
    a thread's); ``clock`` is ``time.monotonic`` but in the state-machine test.
    """

    child_class = ChildProcess

    def __init__(self, *, processes: int, slots_per_child: int, limit: int,
                 spawn: Callable[[int], tuple[Any, int, int]], driver: Any,
                 cancel_grace_s: float, semaphore: Any = None,
                 max_jobs_per_child: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.processes = processes
        self.max_jobs_per_child = max_jobs_per_child
        self.slots_per_child = slots_per_child
        self.limit = limit
        self._spawn = spawn
        self.driver = driver
        self.cancel_grace_s = cancel_grace_s
        self.semaphore = semaphore
        self.children: dict[int, ChildProcess] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        # Told of each job's end: (task name, Celery's trace result or (1, error, None)).
        self.on_outcome: Callable[[str, Any], None] | None = None
        self._next_job_id = 0
        self.accepting = True
        self.respawn = True
        self.cold = False
        self.clock = clock
        self._depth = threading.local()
        self._later: dict[int, tuple[float, Callback, tuple[Any, ...], Any]] = {}
        self._later_ids = itertools.count()

    def later(self, delay_s: float, callback: Callback, *args: Any) -> None:
        """Call ``callback(*args)`` in ``delay_s`` on the driver, and on the next one after
        ``move_to``: a revoke or a stuck-job check must not stay behind on a stopped hub."""
        key = next(self._later_ids)
        when = self.clock() + delay_s
        timer = self.driver.call_later(delay_s, self._fire_later, key)
        self._later[key] = (when, callback, args, timer)

    def _fire_later(self, key: int) -> None:
        entry = self._later.pop(key, None)
        if entry is not None:
            entry[1](*entry[2])

    def busy_here(self) -> bool:
        """Whether this thread is inside the supervisor (a signal handler interrupted it)."""
        return bool(getattr(self._depth, "value", 0))

    # --- children -------------------------------------------------------------------------

    def start(self) -> None:
        for index in range(self.processes):
            self._start_child(index)

    @_entry
    def resize(self, processes: int) -> None:
        """Run ``processes`` children: start new ones, or retire the least busy.

        A retired child takes no new jobs, finishes those it has and is not replaced.
        """
        serving = sorted((c for c in self.children.values() if not c.retired),
                         key=lambda c: (len(c.jobs), -c.index))
        self.processes = processes
        for child in serving[:max(0, len(serving) - processes)]:
            child.retired = True
            self._stop_child(child)
        indices = {c.index for c in serving}
        free = (i for i in itertools.count() if i not in indices)
        for _ in range(processes - len(serving)):
            self._start_child(next(free))
        self.dispatch()

    def _start_child(self, index: int) -> None:
        process, job_fd, report_fd = self._spawn(index)
        os.set_blocking(job_fd, False)
        os.set_blocking(report_fd, False)
        child = self.child_class(index, process, job_fd, report_fd, self.slots_per_child,
                                 self.max_jobs_per_child)
        self.children[child.pid] = child
        self._watch(child)

    @_entry
    def _on_reports(self, child: ChildProcess) -> None:
        messages = wire.read_available(child.report_fd, child.decoder)
        if messages is None:
            self.driver.remove_reader(child.report_fd)
            return
        for message in messages:
            self._handle(child, message)

    def _handle(self, child: ChildProcess, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == ACK:
            self._on_ack(child, *message[1:])
        elif kind == READY:
            self._on_ready(child, message[1], message[2])
        elif kind == UP:
            child.up = True
            self.dispatch()
        elif kind == STATS:
            child.stats, child.stats_at = message[1], self.clock()
        elif kind == DRAINING:
            logger.info("asyncsql child %s drains and will be replaced: %s", child.pid, message[1])
            child.draining = True
        elif kind == BLOCKED:
            self._on_blocked(child, bool(message[1]))
        elif kind == BYE:
            child.draining = True

    def _on_blocked(self, child: ChildProcess, blocked: bool) -> None:
        child.blocked = blocked
        if blocked:
            logger.info("asyncsql child %s: its event loop is blocked; no new task goes to it "
                        "until the loop runs again", child.pid)
        else:
            self.dispatch()

    @_entry
    def _on_exit(self, child: ChildProcess) -> None:
        """Fail the child's started jobs, re-dispatch the rest, and replace it."""
        self.driver.remove_reader(child.process.sentinel)
        self._on_reports(child)  # what it said before it went
        self.driver.remove_reader(child.report_fd)
        child.process.join(5)  # the sentinel says it is gone; this reaps it
        exitcode = child.process.exitcode
        child.gone = True
        del self.children[child.pid]
        for fd in (child.job_fd, child.report_fd):
            os.close(fd)
        started = sum(1 for job in child.jobs.values() if job.accepted)
        if exitcode != 0 or started:
            logger.error("asyncsql child %s exited with %s while running %d job(s)",
                         child.pid, _exit_reason(exitcode), started)
        for job in child.jobs.values():
            if job.settled:
                continue  # revoked or past its hard limit: nothing left to run or to tell
            if self.cold:
                job.settle(notify=False)
            elif job.accepted:
                job.settle(error=WorkerLostError(
                    f"Worker exited prematurely: {_exit_reason(exitcode)} Job: {job.id}."))
            else:
                job.child = None
                self.waiting.appendleft(job)
        child.jobs.clear()
        if self.respawn and not child.retired:
            self._start_child(child.index)
        self.dispatch()

    # --- jobs -----------------------------------------------------------------------------

    @_entry
    def apply(self, target: Callback, args: Any, kwargs: Any, options: dict[str, Any]) -> Job:
        self._next_job_id += 1
        job = Job(self, self._next_job_id, target, args, kwargs, options)
        self.waiting.append(job)
        self.dispatch()
        return job

    def in_flight(self) -> int:
        return sum(len(child.jobs) for child in self.children.values())

    @_entry
    def dispatch(self) -> None:
        """Send waiting jobs to the least-loaded children with free slots, within ``limit``.

        A job whose task id still runs in a child waits for that run to end: a task that
        retried itself with no countdown is redelivered before its tracer has stored
        RETRY, and that store, were the new run quick, would land after its SUCCESS.
        """
        room = self.limit - self.in_flight()
        held: list[Job] = []
        running: set[Any] | None = None
        while self.waiting and self.accepting and room > 0:
            child = max(self.children.values(), key=lambda c: c.free_slots, default=None)
            if child is None or child.free_slots <= 0:
                break
            job = self.waiting.popleft()
            if running is None:
                running = {j.task_id for c in self.children.values() for j in c.jobs.values()}
            if job.task_id is not None and job.task_id in running:
                held.append(job)
                continue
            running.add(job.task_id)
            job.child = child
            child.jobs[job.id] = job
            child.sent += 1
            self._send(child, job.message)
            room -= 1
        self.waiting.extendleft(reversed(held))

    def _send(self, child: ChildProcess, data: bytes) -> None:
        if child.outbox:
            child.outbox += data
            return
        written = wire.write_some(child.job_fd, data)
        if written < 0:
            return  # the child is gone; its exit settles its jobs
        if written < len(data):
            child.outbox += data[written:]
            self.driver.add_writer(child.job_fd, self._flush, child)

    @_entry
    def _flush(self, child: ChildProcess) -> None:
        written = wire.write_some(child.job_fd, bytes(child.outbox))
        if written > 0:
            del child.outbox[:written]
        if not child.outbox or written < 0:
            child.outbox.clear()
            self.driver.remove_writer(child.job_fd)

    def _on_ack(self, child: ChildProcess, job_id: int, pid: int, time_accepted: float) -> None:
        job = child.jobs.get(job_id)
        if job is None or job.settled:
            return
        job.accepted = True
        now = self.clock()
        if job.soft_timeout:
            self._arm(job, now + job.soft_timeout, self._on_soft_limit)
        if job.timeout:
            self._arm(job, now + job.timeout, self._on_hard_limit)
        if job.accept_callback is not None:
            try:
                job.accept_callback(pid, time_accepted)
            except Exception:
                logger.exception("Accepting job %s failed", job.correlation_id)

    def _arm(self, job: Job, when: float, action: Callback) -> None:
        job.deadlines.append((when, action))
        job.timers.append(self.driver.call_later(max(0.0, when - self.clock()), action, job))

    def _on_ready(self, child: ChildProcess, job_id: int, outcome: Any) -> None:
        job = child.jobs.pop(job_id, None)
        if job is None:
            return
        # A no-op for a job settled here (hard limit, revoke). In a cold shutdown
        # the message stays unacknowledged, so the broker redelivers an acks_late task.
        job.settle(outcome, notify=not self.cold)
        if child.stuck:
            self._kill_if_only_stuck(child)
        elif child.spent and not child.jobs:
            self._stop_child(child)
        self.dispatch()

    def release_slot(self) -> None:
        if self.semaphore is not None:
            self.semaphore.release()

    # --- per-job control ------------------------------------------------------------------

    def _cancel(self, job: Job, reason: str) -> None:
        if job.child is not None and not job.child.gone:
            self._send(job.child, wire.encode((CANCEL, job.id, reason)))

    @_entry
    def _on_soft_limit(self, job: Job) -> None:
        if job.settled or job.child is None:
            return
        self._cancel(job, SOFT)
        if job.timeout_callback is not None:
            job.timeout_callback(soft=True, timeout=job.soft_timeout)

    @_entry
    def _on_hard_limit(self, job: Job) -> None:
        """Store ``TimeLimitExceeded`` now, as prefork does, and cancel the coroutine."""
        if job.settled or job.child is None:
            return
        # Celery's on_timeout stores the failure, runs the failure hooks and acks;
        # also calling the error callback, as billiard does, would store it twice.
        job.settle(notify=False)
        if job.timeout_callback is not None:
            job.timeout_callback(soft=False, timeout=job.timeout)
        self._cancel_or_kill(job, HARD)

    @_entry
    def revoke(self, job: Job, signum: int) -> None:
        """``revoke(terminate=True)``: cancel this job alone, whatever the signal.

        A job whose READY already waits in the pipe keeps its outcome, as on
        prefork: a cold shutdown after ``worker_soft_shutdown_timeout`` cancels
        every request the blocked hub has not settled, finished ones too.
        """
        if job.child is not None and not job.child.gone:
            self._on_reports(job.child)
        if job.settled:
            return
        if job.child is None:
            self.waiting.remove(job)
        job.settle(error=Terminated(signum))
        if job.child is not None:
            self._cancel_or_kill(job, REVOKE)

    def _cancel_or_kill(self, job: Job, reason: str) -> None:
        """Cancel the job's coroutine; if it is not done within the grace, see to its child."""
        child = job.child
        assert child is not None
        self._cancel(job, reason)
        self.later(self.cancel_grace_s, self._check_cancelled, child, job,
                               reason, self.clock())

    @_entry
    def _check_cancelled(self, child: ChildProcess, job: Job, reason: str,
                         cancelled_at: float) -> None:
        """Deal with a job that still runs ``cancel_grace_s`` after it was cancelled.

        If the child's loop has been silent for ``LOOP_SILENT_S``, the job blocks
        it: the child is killed now. If the loop ran since the cancel, the job
        ignores it (a coroutine that swallows ``CancelledError``, a sync task):
        the child takes no new jobs and is killed once its other jobs are done,
        so they finish. Otherwise look again later.
        """
        if child.gone or child.jobs.get(job.id) is not job:
            return
        label = task_label(job.task)
        silent_s = self.clock() - max(child.stats_at or 0.0, cancelled_at)
        if silent_s > LOOP_SILENT_S:
            logger.error("asyncsql child %s still runs task %s %.1fs after it was cancelled "
                         "(%s), and its event loop has not run for %.1fs: the task blocks the "
                         "loop (await instead of blocking); killing the child.",
                         child.pid, label, self.clock() - cancelled_at, reason, silent_s)
            child.kill()
            return
        if not child.stuck and (child.stats_at or 0.0) > cancelled_at:
            child.stuck = child.draining = True
            logger.error("asyncsql child %s still runs task %s %ss after it was cancelled (%s) "
                         "though its loop runs: the task ignores cancellation. The child takes "
                         "no new jobs and is replaced once its %d other job(s) are done.",
                         child.pid, label, self.cancel_grace_s, reason,
                         sum(not other.settled for other in child.jobs.values()))
            if self._kill_if_only_stuck(child):
                return
        self.later(STATS_INTERVAL_S, self._check_cancelled, child, job, reason,
                               cancelled_at)

    def _kill_if_only_stuck(self, child: ChildProcess) -> bool:
        """Kill a stuck child once every job left in it was settled here; whether it was."""
        if any(not job.settled for job in child.jobs.values()):
            return False
        child.kill()
        return True

    @_entry
    def watch(self) -> None:
        """Register every child's report pipe, sentinel and pending writes with the driver.

        Again after the broker connection drops: the worker's hub then forgets
        every fd (``Hub.reset``), and no report or exit would be seen.
        """
        for child in self.children.values():
            self._watch(child)

    def _watch(self, child: ChildProcess) -> None:
        self.driver.add_reader(child.report_fd, self._on_reports, child)
        self.driver.add_reader(child.process.sentinel, self._on_exit, child)
        if child.outbox:
            self.driver.add_writer(child.job_fd, self._flush, child)

    def move_to(self, driver: Any) -> None:
        """Watch the children and run the job timers and the ``later`` calls on ``driver``
        instead (the hub stopped)."""
        old, self.driver = self.driver, driver
        for child in self.children.values():
            for fd in (child.report_fd, child.process.sentinel):
                old.remove_reader(fd)
            if child.outbox:
                old.remove_writer(child.job_fd)
        self.watch()
        for child in self.children.values():
            for job in child.jobs.values():
                deadlines = list(job.deadlines)
                job.cancel_timers()
                for when, action in deadlines:
                    self._arm(job, when, action)
        for key, (when, callback, args, timer) in list(self._later.items()):
            timer.cancel()
            self._later[key] = (when, callback, args, driver.call_later(
                max(0.0, when - self.clock()), self._fire_later, key))

    # --- shutdown -------------------------------------------------------------------------

    def stop_children(self, *, cancel: bool) -> None:
        """Send STOP to every child; with ``cancel``, cancel their jobs first (cold shutdown)."""
        self.accepting = False
        self.respawn = False
        self.cold = cancel
        for child in list(self.children.values()):
            if cancel:
                for job in child.jobs.values():
                    self._send(child, wire.encode((CANCEL, job.id, SHUTDOWN)))
            self._send(child, wire.encode((STOP,)))

    def fail_waiting(self) -> None:
        while self.waiting:
            self.waiting.popleft().settle(error=WorkerLostError("The worker stopped before "
                                                                "this job was sent to a child."))

    def _stop_child(self, child: ChildProcess) -> None:
        """Ask a child to leave once its jobs are done (it may be leaving already)."""
        if not child.draining:
            child.draining = True
            self._send(child, wire.encode((STOP,)))

    def kill_all(self) -> None:
        for child in list(self.children.values()):
            child.kill()

    def info(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [{"pid": child.pid, "slots": child.slots, "in-flight": len(child.jobs),
                 "draining": child.draining,
                 "engines": child.stats.get("engines", {}),
                 "loop-lag-s": child.stats.get("loop_lag_s"),
                 "snapshot-age-s": (None if child.stats_at is None
                                    else round(now - child.stats_at, 3))}
                for child in self.children.values()]


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"signal {-exitcode} ({signal.Signals(-exitcode).name})"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exitcode {exitcode}"
