"""A child's event loop under blocking code: the watchdog, and publishing from a coroutine.

Each worker has one child, so every task here shares one loop.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

import redis

from . import tasks_loop as tl
from .app import BROKER_URL
from .conftest import eventually

INCLUDE = "tests.integration.tasks,tests.integration.tasks_loop"
WARNING = "has not run for"


@contextmanager
def one_child(worker_factory, slots=2, conf=None):
    """A worker with ``slots`` slots in one child, which has started."""
    conf = {"asyncsql_processes": 1, "task_track_started": True, **(conf or {})}
    with worker_factory(concurrency=slots, include=INCLUDE, conf=conf) as worker:
        worker.wait_for_children(1)
        yield worker


def started(*results):
    eventually(lambda: all(r.state == "STARTED" for r in results), what="tasks started")


def test_a_blocking_coroutine_is_named_with_its_stack_and_its_sibling_still_succeeds(
        worker_factory):
    with one_child(worker_factory) as worker:
        sibling = worker.send(tl.nap, 1)
        started(sibling)
        blocker = worker.send(tl.block, 2)
        assert blocker.get(timeout=30) == sibling.get(timeout=30)["child"]
        worker.wait_for_log("runs again after being blocked")
        log = worker.logs()
    assert log.count(WARNING) == 1, log[-5000:]
    warning = log[log.index(WARNING):]
    assert f"task tests.integration.tasks_loop.block[{blocker.id}]" in warning
    assert 'tasks_loop.py", line' in warning and "in block" in warning
    assert "time.sleep(seconds)  # blocks the loop" in warning


def test_an_idle_worker_logs_no_warning_and_the_watchdog_is_on(worker_factory):
    with one_child(worker_factory, conf={"asyncsql_loop_block_warning_s": 0.2}) as worker:
        time.sleep(3)  # idle: the loop only waits for work
        assert WARNING not in worker.logs()
        worker.send(tl.block, 1).get(timeout=30)
        worker.wait_for_log(WARNING)  # the same watchdog was watching all along


def test_no_warning_when_the_watchdog_is_off(worker_factory):
    with one_child(worker_factory, conf={"asyncsql_loop_block_warning_s": None}) as worker:
        worker.send(tl.block, 1.5).get(timeout=30)
        worker.send(tl.noop).get(timeout=30)
        assert WARNING not in worker.logs()


def test_publishing_from_a_coroutine_keeps_a_siblings_timers_timely(worker_factory):
    sink = f"itest-sink-{uuid.uuid4().hex[:10]}"
    broker = redis.Redis.from_url(BROKER_URL)
    try:
        with one_child(worker_factory, conf={"asyncsql_loop_block_warning_s": 0.2}) as worker:
            probe = worker.send(tl.timer_lag, 4, 0.01)
            started(probe)
            published = worker.send(tl.publish_many, 300, sink, 0.002).get(timeout=60)
            lag = probe.get(timeout=30)
            assert published["child"] == lag["child"]
            # No stall of the loop: the first publish connects the producer in milliseconds;
            # a second is a blocked loop (the speed itself is the benchmark's to measure).
            assert published["slowest_s"] < 1, published
            assert lag["max_lag_s"] < 1, lag
            assert broker.llen(sink) == 300
            assert WARNING not in worker.logs()
    finally:
        broker.delete(sink)


def test_a_publish_to_an_unreachable_broker_raises_in_the_coroutine(worker_factory):
    with one_child(worker_factory) as worker:
        # Port 1 refuses connections: Celery's publish retry policy runs, then raises.
        outcome = worker.send(tl.publish_unreachable, "redis://127.0.0.1:1/0").get(timeout=60)
    assert outcome["error"] == "OperationalError", outcome


def test_children_take_the_gil_back_sooner_unless_told_otherwise(worker_factory):
    with one_child(worker_factory) as worker:
        assert worker.send(tl.switch_interval).get(timeout=30) == 0.001
    with one_child(worker_factory, conf={"asyncsql_switch_interval_s": None}) as worker:
        assert worker.send(tl.switch_interval).get(timeout=30) == 0.005  # Python's
