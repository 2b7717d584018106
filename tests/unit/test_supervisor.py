"""What the parent does with a job that still runs after it was cancelled."""

import os
import time
from types import SimpleNamespace

import pytest

from celery_asyncpool.parent import supervisor as sv
from celery_asyncpool.wire import HARD


class _Driver:
    """Timers and fds are noted, never run: the test calls what they would."""

    def __init__(self):
        self.later = []

    def call_later(self, delay, callback, *args):
        self.later.append((delay, callback, args))
        return SimpleNamespace(cancel=lambda: None)

    def add_reader(self, *args):
        pass


def _target():
    pass


@pytest.fixture
def stuck(monkeypatch):
    """A child running a cancelled job and one other, and the pids it killed."""
    killed = []
    monkeypatch.setattr(sv.ChildProcess, "kill", lambda child: killed.append(child.pid))
    supervisor = sv.Supervisor(processes=1, slots_per_child=2, limit=2, spawn=None,
                               driver=_Driver(), cancel_grace_s=1)
    read_fd, write_fd = os.pipe()
    child = sv.ChildProcess(0, SimpleNamespace(pid=4242), write_fd, read_fd, 2)
    supervisor.children[child.pid] = child
    cancelled, other = (supervisor.apply(_target, ("t.task", task_id), {}, {})
                        for task_id in ("a", "b"))
    child.up = True
    supervisor.dispatch()
    cancelled.settle(notify=False)  # as the hard limit does
    yield supervisor, child, cancelled, other, killed
    os.close(read_fd)
    os.close(write_fd)


def test_a_child_whose_loop_runs_drains_then_is_killed_once_its_other_jobs_are_done(stuck,
                                                                                   caplog):
    supervisor, child, cancelled, other, killed = stuck
    child.stats_at = time.monotonic()
    supervisor._check_cancelled(child, cancelled, HARD, child.stats_at - 0.5)
    assert (child.stuck, child.draining, killed) == (True, True, [])
    assert "task t.task[a]" in caplog.text and "1 other job(s)" in caplog.text
    supervisor._on_ready(child, other.id, (0, "'done'", 0.1))
    assert killed == [child.pid]


def test_a_child_whose_loop_is_silent_is_killed_now(stuck, caplog):
    supervisor, child, cancelled, other, killed = stuck
    child.stats_at = time.monotonic() - sv.LOOP_SILENT_S - 2
    supervisor._check_cancelled(child, cancelled, HARD, time.monotonic() - sv.LOOP_SILENT_S - 1)
    assert killed == [child.pid] and not child.stuck
    assert "task t.task[a]" in caplog.text and "blocks the loop" in caplog.text


def test_undecided_until_the_loop_reports_or_stays_silent(stuck):
    supervisor, child, cancelled, other, killed = stuck
    child.stats_at = time.monotonic() - 1
    supervisor._check_cancelled(child, cancelled, HARD, time.monotonic() - 0.5)
    assert (killed, child.stuck) == ([], False)
    [(_, callback, _, _)] = supervisor._later.values()
    assert callback == supervisor._check_cancelled  # looks again
