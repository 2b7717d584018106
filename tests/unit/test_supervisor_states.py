"""The Supervisor as a state machine: random sequences of what the hub, Celery and the children
do, against fake children on real pipes, with its invariants checked after every step.

The fake children speak the real wire protocol, but choose when: they ack, report, drain, say
bye, close their report pipe and exit in any order, messages written are delivered to the
supervisor later than written (a timer may fire first), and a child may exit with reports
still unread in its pipe. Time is a fake clock the machine advances.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, invariant, precondition,
                                 rule, run_state_machine_as_test)

from celery_asyncpool import wire
from celery_asyncpool.parent import supervisor as sv
from celery_asyncpool.wire import ACK, BYE, DRAINING, JOB, READY, STATS, STOP, UP

SLOTS = 2
PROCESSES = 2
MAX_JOBS = 3  # worker_max_tasks_per_child: more than a child's slots, fewer than twice
GRACE_S = 1.0


class FakeTimer:
    def __init__(self, when, callback, args):
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeDriver:
    """The hub's readers, writers and timers, run only when the machine says so."""

    def __init__(self, clock):
        self.clock = clock
        self.readers, self.writers, self.timers = {}, {}, []
        self.stopped = False
        self.order = itertools.count()

    def add_reader(self, fd, callback, *args):
        self.readers[fd] = (callback, args)

    def remove_reader(self, fd):
        self.readers.pop(fd, None)

    def add_writer(self, fd, callback, *args):
        self.writers[fd] = (callback, args)

    def remove_writer(self, fd):
        self.writers.pop(fd, None)

    def call_later(self, delay, callback, *args):
        timer = FakeTimer(self.clock() + delay, callback, args)
        self.timers.append(timer)
        return timer

    def fire_due(self):
        while not self.stopped:
            due = [t for t in self.timers if not t.cancelled and t.when <= self.clock()]
            if not due:
                return
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            timer.callback(*timer.args)


class FakeProcess:
    pids = itertools.count(900_001)

    def __init__(self):
        self.pid = next(self.pids)
        self.sentinel = 1_000_000 + self.pid  # only a key for the driver: never read
        self.exitcode = None

    def join(self, timeout=None):
        pass


class FakeChild:
    """A child's side of its pipes: reads what the parent sent, writes what it chooses."""

    def __init__(self, machine, index):
        self.process = FakeProcess()
        self.job_r, job_w = os.pipe()
        report_r, self.report_w = os.pipe()
        self.parent_ends = (job_w, report_r)
        self.decoder = wire.Decoder()
        os.set_blocking(self.job_r, False)
        self.running = {}  # job id -> acked
        self.most_running = 0
        self.received = 0
        self.job_after_stop = False
        self.stopping = False
        self.killed = False
        self.exited = False
        self.reports_closed = False
        machine.children.append(self)
        self.report(UP, self.process.pid)  # most children start; a child_exits rule may win

    def read(self):
        for message in wire.read_available(self.job_r, self.decoder) or []:
            if message[0] == JOB:
                self.running[message[1]] = False
                self.most_running = max(self.most_running, len(self.running))
                self.received += 1
                self.job_after_stop |= self.stopping
            elif message[0] == STOP:
                self.stopping = True

    def report(self, *message):
        if not self.reports_closed:
            os.write(self.report_w, wire.encode(message))

    def close_reports(self):
        if not self.reports_closed:
            os.close(self.report_w)
            self.reports_closed = True

    def exit(self, code):
        self.read()
        self.close_reports()
        os.close(self.job_r)
        self.process.exitcode = code
        self.exited = True


class KillRecorder(sv.ChildProcess):
    machine: SupervisorMachine

    def kill(self):
        for child in self.machine.children:
            if child.process.pid == self.pid:
                child.killed = True


class Semaphore:
    def __init__(self):
        self.released = 0

    def release(self):
        self.released += 1


class SupervisorMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.children: list[FakeChild] = []
        self.driver = FakeDriver(self.clock)
        self.semaphore = Semaphore()
        self.outcomes: dict[int, list[str]] = {}
        self.accepts: dict[int, int] = {}
        self.applied: list[sv.Job] = []
        self.terminated: set[sv.Job] = set()  # revoke(terminate=True) asked, a tick ago or more
        supervisor_cls = type("Observed", (sv.Supervisor,), {"child_class": KillRecorder})
        KillRecorder.machine = self
        self.supervisor = supervisor_cls(
            processes=PROCESSES, slots_per_child=SLOTS, limit=PROCESSES * SLOTS,
            spawn=self.spawn, driver=self.driver, cancel_grace_s=GRACE_S,
            semaphore=self.semaphore, max_jobs_per_child=MAX_JOBS, clock=self.clock)
        self.supervisor.start()
        self.hub_polls()  # the children's UP: most runs start with children ready

    def clock(self):
        return self.now

    def spawn(self, index):
        child = FakeChild(self, index)
        return child.process, *child.parent_ends

    def live(self):
        return [c for c in self.children if not c.exited]

    def by_pid(self):
        return {c.process.pid: c for c in self.children}

    # --- what Celery does -----------------------------------------------------------------

    @precondition(lambda self: self.supervisor.accepting)
    @rule(target=jobs, soft=st.sampled_from([None, 1.0]), hard=st.sampled_from([None, 2.0]),
          retry=st.booleans())
    def apply(self, soft, hard, retry):
        """A new task, or (``retry``) the last one again, as a retry with no countdown."""
        token = len(self.applied)
        self.outcomes[token] = []
        self.accepts[token] = 0
        record = self.outcomes[token].append
        options = {
            "callback": lambda outcome: record("success"),
            "error_callback": lambda einfo: record(f"error {type(einfo.exception).__name__}"),
            "accept_callback": lambda pid, at: self.accepts.__setitem__(
                token, self.accepts[token] + 1),
            "timeout_callback": lambda soft, timeout: None if soft else record("hard limit"),
            "soft_timeout": soft, "timeout": hard, "correlation_id": f"task-{token}",
        }
        task = self.applied[-1].task if retry and self.applied else (f"t.task{token}",
                                                                         f"id-{token}")
        job = self.supervisor.apply(print, task, {}, options)
        self.applied.append(job)
        return job

    @rule(job=jobs, signum=st.sampled_from([signal.SIGTERM, signal.SIGKILL]))
    def terminate(self, job, signum):
        job.terminate(signum)  # as Celery's Request.terminate: the revoke runs on a later tick
        self.terminated.add(job)

    @rule(grow=st.integers(-2, 2))
    def resize(self, grow):
        self.supervisor.limit = max(0, self.supervisor.limit + grow)
        self.supervisor.dispatch()

    @rule(processes=st.integers(1, 3))
    def grow_or_shrink_children(self, processes):
        """pool_grow / pool_shrink past the children laid out at start."""
        self.supervisor.resize(processes)

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0]))
    def advance(self, dt):
        self.now += dt
        self.driver.fire_due()
        unsettled = [job.id for job in self.terminated if not job.settled]
        assert not unsettled, f"jobs {unsettled} were revoked a tick ago and still run"

    @precondition(lambda self: not self.driver.stopped)
    @rule(now=st.integers(0, 9))
    def hub_stops(self, now):
        """Warm shutdown's hand-over: the hub stops; a new driver takes the children on.
        Drawn one time in ten, as the shutdown rules are, so runs get far before they end
        (a child's exit, drain, bye or closing its pipe: one time in four)."""
        if now:
            return
        self.driver.stopped = True
        self.driver = FakeDriver(self.clock)
        self.supervisor.move_to(self.driver)

    @precondition(lambda self: self.supervisor.accepting)
    @rule(cold=st.booleans(), now=st.integers(0, 9))
    def stop(self, cold, now=0):
        if now:
            return
        self.supervisor.stop_children(cancel=cold)
        if cold:
            self.supervisor.fail_waiting()

    # --- what a child does ----------------------------------------------------------------

    def _child(self, data, busy=False):
        """A live child, drawn; with ``busy``, one that has jobs, so that the step does
        something."""
        candidates = [c for c in self.live() if c.running or not busy]
        return data.draw(st.sampled_from(candidates)) if candidates else None

    @rule(data=st.data())
    def child_starts_its_jobs(self, data):
        """The children read their job pipes; one acks what it read (the others drop their
        acks, or send them in a later step)."""
        for child in self.live():
            child.read()
        child = self._child(data, busy=True)
        if child is not None and not child.killed:
            for job_id, acked in list(child.running.items()):
                if not acked:
                    child.running[job_id] = True
                    child.report(ACK, job_id, child.process.pid, self.now)

    @rule(data=st.data(), ok=st.booleans())
    def child_finishes(self, data, ok):
        child = self._child(data, busy=True)
        if child is not None and not child.killed:
            job_id = data.draw(st.sampled_from(sorted(child.running)))
            del child.running[job_id]
            child.report(READY, job_id, (0, "'ok'", 0.1) if ok else (1, None, 0.1))

    @rule(data=st.data())
    def child_reports_stats(self, data):
        child = self._child(data)
        if child is not None and not child.killed:
            child.report(STATS, {"in_flight": len(child.running)})

    @rule(data=st.data(), now=st.integers(0, 3))
    def child_drains(self, data, now):
        child = None if now else self._child(data)
        if child is not None:
            child.report(DRAINING, "max_tasks_per_child reached")

    @rule(data=st.data(), now=st.integers(0, 3))
    def child_says_bye(self, data, now):
        child = None if now else self._child(data)
        if child is not None and not child.running:
            child.report(BYE)

    @rule(data=st.data(), now=st.integers(0, 3))
    def child_closes_its_report_pipe(self, data, now):
        child = None if now else self._child(data)
        if child is not None:
            child.close_reports()

    @rule()
    def hub_polls(self):
        """The hub sees the children's report pipes readable (or at EOF) and reads them."""
        for child in self.children:
            reader = self.driver.readers.get(child.parent_ends[1])
            if reader is not None:
                callback, args = reader
                callback(*args)

    @rule(data=st.data(), code=st.sampled_from([0, 1, -signal.SIGKILL]), now=st.integers(0, 3))
    def child_exits(self, data, code, now):
        """The child process ends, maybe with reports unread; the hub sees its sentinel when it
        watches it. A killed child always ends; another one time in four, so runs get far."""
        child = self._child(data)
        if child is not None and now and not child.killed:
            return
        if child is None:
            return
        child.exit(-signal.SIGKILL if child.killed else code)
        self._see_exit(child)

    def _see_exit(self, child):
        sentinel = self.driver.readers.get(child.process.sentinel)
        if sentinel is not None:
            callback, args = sentinel
            callback(*args)

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def each_job_settles_at_most_once_and_is_accepted_at_most_once(self):
        for token, outcomes in self.outcomes.items():
            assert len(outcomes) <= 1, f"job {token} settled {outcomes}"
            assert self.accepts[token] <= 1, f"job {token} accepted {self.accepts[token]} times"

    @invariant()
    def the_semaphore_is_released_once_per_settled_job(self):
        settled = sum(job.settled for job in self.applied)
        assert self.semaphore.released == settled

    @invariant()
    def a_job_is_in_one_place(self):
        placed = [job.id for child in self.supervisor.children.values()
                  for job in child.jobs.values()]
        waiting = [job.id for job in self.supervisor.waiting]
        assert len(placed) == len(set(placed))
        assert not set(placed) & set(waiting)
        for child in self.supervisor.children.values():
            assert all(job.child is child for job in child.jobs.values())
        assert all(job.child is None for job in self.supervisor.waiting)
        assert not any(job.settled for job in self.supervisor.waiting)

    @invariant()
    def no_job_is_left_on_a_dead_child(self):
        pids = self.by_pid()
        for pid, child in self.supervisor.children.items():
            assert not child.gone
            assert not (pids[pid].exited and child.process.sentinel not in self.driver.readers)

    @invariant()
    def slots_are_never_exceeded(self):
        for child in self.supervisor.children.values():
            assert len(child.jobs) <= child.slots
        for child in self.children:
            assert child.most_running <= SLOTS, "a child was sent more jobs than its slots"

    @invariant()
    def a_task_id_runs_once_at_a_time(self):
        running = [job.task[1] for child in self.supervisor.children.values()
                   for job in child.jobs.values()]
        assert len(running) == len(set(running)), f"a task id runs twice at once: {running}"

    @invariant()
    def a_child_is_sent_at_most_max_jobs_and_none_after_stop(self):
        for child in self.children:
            assert child.received <= MAX_JOBS, "a child was sent more than max_tasks_per_child"
            assert not child.job_after_stop, "a child was sent a job after it was stopped"

    @invariant()
    def the_children_serving_are_as_many_as_asked(self):
        if self.supervisor.respawn:
            serving = [c for c in self.supervisor.children.values() if not c.retired]
            assert len(serving) == self.supervisor.processes

    @invariant()
    def a_settled_jobs_timers_are_cancelled(self):
        for job in self.applied:
            if job.settled:
                assert all(timer.cancelled for timer in job.timers)

    def teardown(self):
        """Stop cold, let every child go: every job has then settled exactly once."""
        try:
            if self.supervisor.accepting:
                self.stop(cold=True)
            for child in self.live():
                child.exit(-signal.SIGKILL)
                self._see_exit(child)
            self.supervisor.fail_waiting()
            assert not self.supervisor.children
            assert self.semaphore.released == len(self.applied)
            assert all(job.settled for job in self.applied)
        finally:
            for child in self.children:
                for fd in (child.job_r, child.report_w, *child.parent_ends):
                    try:
                        os.close(fd)
                    except OSError:
                        pass


MACHINE_SETTINGS = settings(max_examples=200, stateful_step_count=80, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def quiet_supervisor():
    """The machine kills children by the thousand: their log lines would cost most of its time."""
    logger = logging.getLogger(sv.__name__)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


def test_the_supervisor_keeps_its_invariants():
    run_state_machine_as_test(SupervisorMachine, settings=MACHINE_SETTINGS)


def test_the_machine_catches_a_job_settled_twice(monkeypatch):
    """Without ``Job.settle``'s guard the machine must find a counterexample."""
    def unguarded(job, outcome=None, error=None, notify=True):
        job.settled = True
        job.cancel_timers()
        job.supervisor.release_slot()
        if notify and error is None and job.callback is not None:
            job.callback(outcome)
        elif notify and job.error_callback is not None:
            job.error_callback(sv._exception_info(error or RuntimeError()))

    monkeypatch.setattr(sv.Job, "settle", unguarded)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(SupervisorMachine, settings=settings(
            MACHINE_SETTINGS, max_examples=300, database=None, report_multiple_bugs=False,
            derandomize=True,
            phases=[Phase.generate]))


def test_the_machine_catches_a_child_sent_more_than_max_tasks_per_child(monkeypatch):
    """Counting only the jobs in flight, a child with free slots is sent one job too many."""
    monkeypatch.setattr(sv.ChildProcess, "free_slots", property(
        lambda child: 0 if not child.up or child.draining or child.gone
        else child.slots - len(child.jobs)))
    with pytest.raises(AssertionError, match="max_tasks_per_child"):
        run_state_machine_as_test(SupervisorMachine, settings=settings(
            MACHINE_SETTINGS, max_examples=300, database=None, report_multiple_bugs=False,
            derandomize=True, phases=[Phase.generate]))


def test_the_machine_catches_a_retried_task_run_beside_its_first_run(monkeypatch):
    """Without the hold on a task id in flight, a retry is sent while its first run ends."""
    init = sv.Job.__init__

    def without_task_id(job, *args, **kwargs):
        init(job, *args, **kwargs)
        job.task_id = None

    monkeypatch.setattr(sv.Job, "__init__", without_task_id)
    with pytest.raises(AssertionError, match="a task id runs twice"):
        run_state_machine_as_test(SupervisorMachine, settings=settings(
            MACHINE_SETTINGS, max_examples=300, database=None, report_multiple_bugs=False,
            derandomize=True, phases=[Phase.generate]))
