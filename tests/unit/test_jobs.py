"""The slot-aware child (``child.process.child_main``) in a real forked process; the test is
its parent.

Jobs are built by Celery's own ``Request.execute_using_pool`` from a real task
message, sent down a real pipe, and the child's reports read from the other.
The result backend is in-memory, so it lives in the child: a sync task
(``t.state_of``) reads it there.
"""

import ast
import asyncio
import os
import select
import signal
import threading
import time
import traceback
from pathlib import Path

import pytest
from billiard.exceptions import WorkerLostError
from billiard.pool import MaybeEncodingError
from celery import Celery, current_task, uuid
from celery.app.trace import fast_trace_task, setup_worker_optimizations, trace_task_ret
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.worker.request import Request
from kombu.message import Message
from kombu.serialization import dumps

from celery_asyncpool import hooks, wire as protocol
from celery_asyncpool.child import process as jobs
from celery_asyncpool.wire import (
    ACK,
    BYE,
    CANCEL,
    DRAINING,
    HARD,
    JOB,
    READY,
    REVOKE,
    SHUTDOWN,
    SOFT,
    STATS,
    STOP,
    UP,
)

HOSTNAME = "jobs-test@localhost"


def _app(db_path):
    """The tasks; ``careful`` and ``spin`` leave a file beside ``db_path`` once in their body,
    so a test sends its CANCEL after that event, not after a guessed sleep."""
    app = Celery("jobs-test", set_as_current=False, broker="memory://",
                 backend="cache+memory://")
    app.marks = Path(db_path).parent
    app.conf.asyncsql_database_url = f"sqlite+aiosqlite:///{db_path}"
    app.conf.asyncsql_cancel_grace_s = 2

    @app.task(shared=False, name="t.nap")
    async def nap(seconds, value=None):
        await asyncio.sleep(seconds)
        return value

    @app.task(shared=False, name="t.identity", bind=True)
    async def identity(self, seconds):
        before = (self.request.id, self.request.retries, current_task.request.id)
        await asyncio.sleep(seconds)
        after = (self.request.id, self.request.retries, current_task.request.id)
        in_thread = await asyncio.to_thread(
            lambda: (self.request.id, self.request.retries, current_task.request.id))
        return [before, after, in_thread]

    @app.task(shared=False, name="t.careful")
    async def careful():
        (app.marks / "careful").touch()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError as exc:
            return f"cleaned up after: {exc.args[0]}"

    @app.task(shared=False, name="t.add")
    def add(x, y):
        return x + y

    @app.task(shared=False, name="t.where")
    def where():
        return threading.current_thread().name

    @app.task(shared=False, name="t.spin")
    def spin(seconds):
        (app.marks / f"spin-{seconds}").touch()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return "spun"

    @app.task(shared=False, name="t.exits")
    def exits():
        raise SystemExit(5)

    @app.task(shared=False, name="t.sync_awaits")
    def sync_awaits():
        return app.tasks["t.nap"].run(0.05, "awaited on the loop")

    @app.task(shared=False, name="t.state_of", bind=True)
    def state_of(self, task_id):
        return self.app.backend.get_task_meta(task_id)["status"]

    return app


def _reached(mark: Path, timeout_s: float = 10.0) -> None:
    """Wait until a task's body has left ``mark``."""
    deadline = time.monotonic() + timeout_s
    while not mark.exists():
        assert time.monotonic() < deadline, f"no {mark.name} within {timeout_s}s"
        time.sleep(0.01)


class _RecordingPool:
    """Takes what ``Request.execute_using_pool`` hands a pool."""

    def apply_async(self, target, args, **options):
        self.applied = (target, args)


def _job(app, name, args=(), *, task_id=None, fast=True, **options):
    """``(target, args)`` exactly as Celery's worker hands them to its pool for this task."""
    sent = app.amqp.as_task_v2(task_id or uuid(), name, args, {}, **options)
    content_type, content_encoding, body = dumps(sent.body, serializer="json")
    message = Message(body=body, content_type=content_type, content_encoding=content_encoding,
                      headers=sent.headers, properties=sent.properties,
                      delivery_info={"exchange": "", "routing_key": "celery"})
    app.use_fast_trace_task = fast
    pool = _RecordingPool()
    Request(message, app=app).execute_using_pool(pool)
    return pool.applied


class Child:
    """A forked ``child_main`` and both ends of its pipes that a parent keeps."""

    def __init__(self, app, slots, max_tasks=None, max_memory_kb=None, before=None):
        self.app = app
        job_read, self.job_fd = protocol.make_pipe()
        self.report_fd, report_write = protocol.make_pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                os.close(self.job_fd)
                os.close(self.report_fd)
                setup_worker_optimizations(app, HOSTNAME)  # a worker does it before forking
                if before is not None:
                    before()
                jobs.child_main(app, HOSTNAME, slots, 1, job_read, report_write, max_tasks,
                                max_memory_kb)
                code = 0
            except SystemExit as exc:
                code = exc.code
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(job_read)
        os.close(report_write)
        os.set_blocking(self.report_fd, False)
        self.decoder = protocol.Decoder()
        self.received = []
        self.next_job_id = 0
        self.exitcode = None

    def send(self, *message):
        protocol.write_all(self.job_fd, protocol.encode(message))

    def job(self, name, args=(), **options):
        """Send a JOB for task ``name``; its job id and task id."""
        target, job_args = _job(self.app, name, args, **options)
        self.next_job_id += 1
        self.send(JOB, self.next_job_id, target, job_args, {})
        return self.next_job_id, job_args[1]

    def next(self, timeout=5.0):
        """The next report; fails after ``timeout`` seconds without one."""
        return self._take(lambda message: True, timeout)

    def _take(self, wanted, timeout):
        """The first report ``wanted`` accepts, read now or before; the others stay queued."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((message for message in self.received if wanted(message)), None)
            if found is not None:
                self.received.remove(found)
                return found
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.report_fd], [], [], left)[0], (
                f"no such report from the child within {timeout}s; got {self.received}")
            messages = protocol.read_available(self.report_fd, self.decoder)
            assert messages is not None, "the child closed its report pipe"
            self.received += messages

    def until(self, kind, timeout=5.0):
        """Reports up to and including the first of ``kind``, STATS left out."""
        seen = []
        while True:
            message = self.next(timeout)
            if message[0] != STATS:
                seen.append(message)
            if message[0] == kind:
                return seen

    def ready(self, job_id, timeout=5.0):
        """The outcome of ``job_id``; other reports stay queued."""
        return self._take(lambda message: message[:2] == (READY, job_id), timeout)[2]

    def acked(self, job_id, timeout=5.0):
        """The time ``job_id`` started, from its ACK; other reports stay queued."""
        _, _, pid, started = self._take(lambda message: message[:2] == (ACK, job_id), timeout)
        assert pid == self.pid
        return started

    def stats(self, timeout=5.0):
        """The next STATS snapshot; other reports stay queued."""
        return self._take(lambda message: message[0] == STATS, timeout)[1]

    def hang_up(self):
        """Close the parent's end of the job pipe, as a parent that died would."""
        os.close(self.job_fd)
        self.job_fd = None

    def wait(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)
                return self.exitcode
            time.sleep(0.01)
        raise AssertionError(f"the child did not exit within {timeout}s")

    def close(self):
        if self.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        for fd in (self.job_fd, self.report_fd):
            if fd is not None:
                os.close(fd)


@pytest.fixture
def app(tmp_path):
    return _app(tmp_path / "x.db")


@pytest.fixture
def start(app):
    started = []

    def start(slots=4, **options):
        child = Child(app, slots, **options)
        started.append(child)
        assert child.next(timeout=10) == (UP, child.pid)
        return child

    yield start
    for child in started:
        child.close()


def _value(outcome):
    """The task's result from a successful tracer outcome: ``(0, repr(result), runtime)``."""
    assert outcome[0] == 0, f"the task failed: {outcome[1]!r}"
    return ast.literal_eval(outcome[1])


def _outcome(reports, job_id):
    """The outcome in the READY of ``job_id`` among ``reports``."""
    return next(message[2] for message in reports if message[:2] == (READY, job_id))


def _exception(outcome):
    assert outcome[0] == 1, f"the task succeeded: {outcome[1]!r}"
    return outcome[1].exception


def test_async_and_sync_jobs_are_acked_then_reported(start):
    child = start()
    async_job, _ = child.job("t.nap", (0, "slept"))
    (ack, _, pid, accepted), ready = child.until(READY)
    assert (ack, pid) == (ACK, child.pid) and abs(accepted - time.monotonic()) < 5
    assert ready[:2] == (READY, async_job) and _value(ready[2]) == "slept"
    sync_job, _ = child.job("t.add", (2, 3), fast=False)  # trace_task_ret, as without optimizations
    where_job, _ = child.job("t.where")
    reports = [child.next() for _ in range(4)]
    for job_id in (sync_job, where_job):
        assert [kind for kind, reported, *_ in reports if reported == job_id] == [ACK, READY]
    assert _value(_outcome(reports, sync_job)) == 5
    assert _value(_outcome(reports, where_job)).startswith("asyncsql-sync")


def test_jobs_built_by_celery_use_its_tracers(app):
    assert _job(app, "t.nap", (0,))[0] is fast_trace_task
    assert _job(app, "t.nap", (0,), fast=False)[0] is trace_task_ret


def test_async_jobs_run_concurrently_on_one_child(start):
    child = start(slots=5)
    began = time.monotonic()
    job_ids = [child.job("t.nap", (1, n))[0] for n in range(5)]
    values = {job_id: _value(child.ready(job_id)) for job_id in job_ids}
    assert values == dict(zip(job_ids, range(5)))
    assert time.monotonic() - began < 4, "five 1 s naps ran one after the other"


def test_each_job_sees_its_own_request_around_awaits_and_in_threads(start):
    child = start(slots=4)
    sent = [child.job("t.identity", (0.05 * (4 - n),), retries=n) for n in range(4)]
    for retries, (job_id, task_id) in enumerate(sent):
        assert _value(child.ready(job_id)) == [(task_id, retries, task_id)] * 3


def test_soft_limit_fails_the_task_unless_it_handles_the_cancellation(start):
    child = start()
    napping, napping_task = child.job("t.nap", (30,))
    careful, _ = child.job("t.careful")
    child.acked(napping), child.acked(careful)
    _reached(child.app.marks / "careful")  # its body is at its await
    child.send(CANCEL, napping, SOFT)
    child.send(CANCEL, careful, SOFT)
    assert isinstance(_exception(child.ready(napping)), SoftTimeLimitExceeded)
    assert _value(child.ready(careful)) == (
        "cleaned up after: celery_asyncpool: soft time limit exceeded")
    probe, _ = child.job("t.state_of", (napping_task,))
    assert _value(child.ready(probe)) == "FAILURE"


@pytest.mark.parametrize("reason", [REVOKE, HARD, SHUTDOWN])
def test_other_cancels_store_nothing_and_spare_the_siblings(start, reason):
    child = start()
    napping, napping_task = child.job("t.nap", (30,))
    careful, careful_task = child.job("t.careful")  # its return value is not stored either
    sibling, _ = child.job("t.nap", (0.4, "sibling"))
    child.acked(napping), child.acked(careful), child.acked(sibling)
    _reached(child.app.marks / "careful")  # its body is at its await
    child.send(CANCEL, napping, reason)
    child.send(CANCEL, careful, reason)
    assert isinstance(_exception(child.ready(napping)), Ignore)
    assert isinstance(_exception(child.ready(careful)), Ignore)
    assert _value(child.ready(sibling)) == "sibling"
    for task_id in (napping_task, careful_task):
        probe, _ = child.job("t.state_of", (task_id,))
        assert _value(child.ready(probe)) == "PENDING"


def test_cancels_of_unknown_jobs_are_ignored(start):
    child = start()
    job_id, _ = child.job("t.nap", (0.1, "done"))
    child.send(CANCEL, 999, REVOKE)
    child.send(CANCEL, job_id, "no such reason")
    assert _value(child.ready(job_id)) == "done"
    child.send(CANCEL, job_id, REVOKE)
    probe, _ = child.job("t.nap", (0, "still serving"))
    assert _value(child.ready(probe)) == "still serving"


def test_sync_jobs_run_one_at_a_time_and_ack_when_they_start(start):
    child = start()
    first, _ = child.job("t.spin", (0.2,))
    second, _ = child.job("t.spin", (0.2,))
    assert child.acked(second) - child.acked(first) >= 0.2  # once the first was done
    assert _value(child.ready(first)) == _value(child.ready(second)) == "spun"


def test_a_sync_task_can_run_an_async_body_on_the_busy_loop(start):
    child = start()
    job_id, _ = child.job("t.sync_awaits")
    assert _value(child.ready(job_id)) == "awaited on the loop"


def test_soft_limit_reaches_a_sync_job_and_spares_the_next(start):
    child = start()
    spinning, _ = child.job("t.spin", (30,))
    child.acked(spinning)
    _reached(child.app.marks / "spin-30")  # in the body: in Celery's prerun it could be eaten
    child.send(CANCEL, spinning, SOFT)
    assert isinstance(_exception(child.ready(spinning)), SoftTimeLimitExceeded)
    after, _ = child.job("t.spin", (0.1,))
    assert _value(child.ready(after)) == "spun"


def test_stop_finishes_the_jobs_in_flight_then_says_bye(start):
    child = start()
    first, _ = child.job("t.nap", (0.3, "first"))
    second, _ = child.job("t.add", (1, 2))
    child.send(STOP)
    reports = child.until(BYE)
    assert {(kind, job_id) for kind, job_id, *_ in reports[:-1]} == {
        (ACK, first), (READY, first), (ACK, second), (READY, second)}
    assert child.wait() == 0


def test_stop_sends_a_snapshot_of_the_jobs_in_flight(start):
    child = start(slots=3)
    child.job("t.nap", (0.3,))
    child.send(STOP)
    assert child.stats() == {"pid": child.pid, "slots": 3, "in_flight": 1, "engines": {
        "default": {"size": 3, "checked_out": 0, "checked_in": 0, "overflow": 0,
                    "waiters": 0}},
        "loop_lag_s": 0.0}
    child.until(BYE)


def test_stats_arrive_every_second_while_serving(start):
    child = start(slots=2)
    job_id, _ = child.job("t.nap", (30,))
    assert [child.stats()["in_flight"] for _ in range(3)] == [1, 1, 1]  # again and again
    child.send(CANCEL, job_id, REVOKE)
    child.ready(job_id)


def test_eof_on_the_job_pipe_stops_the_child_like_stop(start):
    child = start()
    job_id, _ = child.job("t.nap", (0.2, "finished"))
    child.hang_up()
    reports = child.until(BYE)
    assert _value(_outcome(reports, job_id)) == "finished"
    assert child.wait() == 0


def test_max_tasks_drains_runs_late_jobs_then_says_bye(start):
    child = start(max_tasks=1)
    slow, _ = child.job("t.nap", (2, "slow"))  # still running when "late" arrives, even when loaded
    quick, _ = child.job("t.nap", (0, "quick"))  # sent second: "slow" is in flight when it ends
    assert _value(child.ready(quick)) == "quick"
    assert child.until(DRAINING)[-1] == (DRAINING, "max_tasks_per_child reached (1 tasks)")
    late, _ = child.job("t.nap", (0, "late"))  # sent before the parent read DRAINING
    reports = child.until(BYE)
    assert _value(_outcome(reports, late)) == "late"
    assert _value(_outcome(reports, slow)) == "slow"
    assert child.wait() == 0


def test_max_memory_drains_after_a_job(start):
    child = start(max_memory_kb=1)
    job_id, _ = child.job("t.nap", (0, "done"))
    reports = child.until(BYE)
    # DRAINING before READY: the parent must not fill the freed slot.
    assert [kind for kind, *_ in reports] == [ACK, DRAINING, READY, BYE]
    assert reports[1][1].startswith("max_memory_per_child exceeded (")
    assert child.wait() == 0


def test_system_exit_in_a_job_fails_it_as_a_lost_worker_and_drains(start):
    child = start()
    job_id, _ = child.job("t.exits")
    error = _exception(child.ready(job_id))
    assert isinstance(error, WorkerLostError) and "SystemExit(5)" in str(error)
    assert child.until(BYE)[-2:] == [(DRAINING, "a job raised SystemExit(5)"), (BYE,)]
    assert child.wait() == 0


def _unpicklable_outcome(*args):
    return 0, lambda: "cannot cross a pipe", 0.0


def test_an_outcome_that_cannot_be_pickled_is_reported_as_a_failure(start):
    child = start()
    child.send(JOB, 100, _unpicklable_outcome, ("t.add", uuid()), {})
    error = _exception(child.ready(100))
    assert isinstance(error, MaybeEncodingError) and "<lambda>" in str(error)
    probe, _ = child.job("t.add", (1, 1))
    assert _value(child.ready(probe)) == 2


def test_jobs_beyond_the_slots_still_run(start):
    child = start(slots=1)
    began = time.monotonic()
    job_ids = [child.job("t.nap", (1, n))[0] for n in range(5)]
    assert [_value(child.ready(job_id)) for job_id in job_ids] == list(range(5))
    assert time.monotonic() - began < 4, "five 1 s naps ran one after the other"


def test_a_failing_start_hook_exits_nonzero_without_up(app):
    def failing_hook():
        async def broken():
            raise RuntimeError("no database today")
        hooks.on_child_start(broken)
        jobs.RESTART_DELAY_S = 0

    child = Child(app, 1, before=failing_hook)
    try:
        assert child.wait(timeout=10) == jobs.START_FAILED_EXITCODE
        assert protocol.read_available(child.report_fd, child.decoder) is None
    finally:
        child.close()
