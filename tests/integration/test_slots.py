"""Several tasks in flight per child (DESIGN.md section 4, rows 3, 9-12, 14, 16-20 with slots;
9, 10 and 14 with spawned children too, row 22).

Each test fixes ``asyncsql_processes`` so the layout does not depend on the
machine's CPU count: ``-c`` slots spread over that many children. The core
ones run on both brokers, Redis and RabbitMQ (``broker``).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from contextlib import contextmanager

import pytest
import redis
from billiard.exceptions import WorkerLostError
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from . import tasks_slots as ts
from .app import BACKEND_URL, app
from .conftest import BROKERS, RABBITMQ_URL, REDIS_URL, eventually, pg_connections

INCLUDE = "tests.integration.tasks,tests.integration.tasks_slots"


@contextmanager
def slot_worker(worker_factory, slots, processes, conf=None, method="fork", **kwargs):
    """A worker whose ``processes`` children, forked or spawned, have all reported for work."""
    conf = {"asyncsql_processes": processes, "worker_pool_start_method": method, **(conf or {})}
    with worker_factory(concurrency=slots, include=INCLUDE, conf=conf, **kwargs) as worker:
        eventually(lambda: len(_reporting_children(worker)) == processes, 20,
                   f"{processes} children up")
        yield worker


def _reporting_children(worker) -> list[dict]:
    stats = worker.inspect().stats() or {}
    children = stats.get(worker.hostname, {}).get("pool", {}).get("asyncsql", {}).get(
        "children", [])
    return [c for c in children if c["snapshot-age-s"] is not None]


def in_flight(worker) -> int:
    """Jobs the pool has handed its children, from ``inspect stats``."""
    stats = worker.inspect().stats() or {}
    return stats.get(worker.hostname, {}).get("pool", {}).get("asyncsql", {}).get("in-flight", 0)


def most_at_once(intervals) -> int:
    """The largest number of ``(start, end)`` intervals that overlap at one moment."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                   key=lambda edge: (edge[0], edge[1]))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


# --- row 3: slots x sleep(1) finish in about 1 s, no child above its slots ---------------------

@pytest.mark.parametrize("broker,slots", [
    pytest.param(REDIS_URL, 8, id="redis-4-slots"),
    pytest.param(RABBITMQ_URL, 8, id="amqp-4-slots"),
    pytest.param(REDIS_URL, 2, id="redis-1-slot"),
])
def test_slots_run_at_once_and_no_child_runs_more_than_its_slots(worker_factory, broker, slots):
    per_child = slots // 2
    with slot_worker(worker_factory, slots=slots, processes=2, broker=broker) as worker:
        children = worker.wait_for_children(2)
        [worker.send(ts.span, 0).get(timeout=30) for _ in range(4)]  # warm
        started = time.monotonic()
        results = [worker.send(ts.span, 1) for _ in range(2 * slots)]
        done = [r.get(timeout=30) for r in results]
        elapsed = time.monotonic() - started
        # Two rounds: about 2 s. Only a bound that no slot-starved run meets; the overlap of
        # the tasks' own start and end stamps below is what shows the slots.
        assert elapsed < 10, f"{2 * slots} one-second tasks on {slots} slots took {elapsed:.1f}s"
        assert {d["child"] for d in done} == set(children)
        for child in children:
            mine = [(d["start"], d["end"]) for d in done if d["child"] == child]
            assert most_at_once(mine) <= per_child, f"child {child} ran more than its slots"
        assert most_at_once([(d["start"], d["end"]) for d in done]) == slots


def test_no_task_waits_behind_a_busy_child_while_another_has_room(worker_factory):
    with slot_worker(worker_factory, slots=4, processes=2) as worker:
        worker.wait_for_children(2)
        long = [worker.send(ts.span, 4) for _ in range(2)]
        eventually(lambda: in_flight(worker) == 2, 10, "both long tasks running")
        short = [worker.send(ts.span, 0.2) for _ in range(2)]
        ends = [r.get(timeout=30)["end"] for r in short]
        long_done = [r.get(timeout=30) for r in long]
        assert {d["child"] for d in long_done} == set(worker.children()), \
            "the two long tasks went to different children"
        assert max(ends) < min(d["end"] for d in long_done) - 2, "a short task waited"


# --- rows 10-12 with siblings in the same child ------------------------------------------------

@pytest.mark.parametrize("interrupt,method", [
    ("soft", "fork"), ("hard", "fork"), ("revoke", "fork"), ("soft", "spawn")])
def test_limits_and_revoke_hit_only_their_task_in_a_shared_child(
        worker_factory, interrupt, method):
    with slot_worker(worker_factory, slots=3, processes=1, method=method) as worker:
        [child] = worker.wait_for_children(1)
        options = {"soft": {"soft_time_limit": 1}, "hard": {"time_limit": 1},
                   "revoke": {}}[interrupt]
        target = worker.send(ts.span, 30, **options)
        siblings = [worker.send(ts.span, 2.5) for _ in range(2)]
        eventually(lambda: _inspect_active(worker) == 3, 10, "all three running")
        if interrupt == "revoke":
            app.control.revoke(target.id, terminate=True, signal="SIGKILL",
                               destination=[worker.hostname], reply=True, timeout=10)
        expected = {"soft": SoftTimeLimitExceeded, "hard": TimeLimitExceeded}.get(interrupt)
        if expected is None:
            eventually(lambda: app.backend.get_task_meta(target.id, cache=False)["status"]
                       == "REVOKED", 20, "target REVOKED")
        else:
            with pytest.raises(expected):
                target.get(timeout=20)
        assert [s.get(timeout=20)["child"] for s in siblings] == [child, child]
        assert worker.children() == [child], "the shared child was kept"
        if interrupt == "revoke":
            time.sleep(1)
            assert app.backend.get_task_meta(target.id, cache=False)["status"] == "REVOKED"


def _inspect_active(worker) -> int:
    active = worker.inspect().active() or {}
    return len(active.get(worker.hostname, []))


def test_a_task_that_ignores_cancellation_gets_its_child_replaced_after_its_siblings(
        worker_factory):
    with slot_worker(worker_factory, slots=2, processes=1,
                     conf={"asyncsql_cancel_grace_s": 1}) as worker:
        [child] = worker.wait_for_children(1)
        target = worker.send(ts.stubborn, 30, time_limit=1)
        sibling = worker.send(ts.span, 4)  # outlasts the limit and the grace
        with pytest.raises(TimeLimitExceeded):
            target.get(timeout=20)
        worker.wait_for_log("the task ignores cancellation")
        late = worker.send(ts.span, 0)  # waits: the stuck child takes no new job
        assert sibling.get(timeout=20)["child"] == child
        assert late.get(timeout=20)["child"] != child
        [replacement] = worker.wait_for_children(1)
        assert replacement != child


def test_a_task_that_blocks_its_loop_after_a_cancel_gets_its_child_killed(worker_factory):
    with slot_worker(worker_factory, slots=2, processes=1,
                     conf={"asyncsql_cancel_grace_s": 1}) as worker:
        [child] = worker.wait_for_children(1)
        sibling = worker.send(ts.span, 30)
        eventually(lambda: _inspect_active(worker) == 1, 10, "the sibling running")
        target = worker.send(ts.blocks, 60, time_limit=1)
        with pytest.raises(TimeLimitExceeded):
            target.get(timeout=20)
        with pytest.raises(WorkerLostError):
            sibling.get(timeout=20)
        [replacement] = worker.wait_for_children(1)
        assert replacement != child
        assert "the task blocks the loop" in worker.logs()


# --- row 9: a child killed with several jobs in flight -----------------------------------------

@pytest.mark.parametrize(("method", "broker"), [
    pytest.param("fork", REDIS_URL, id="fork-redis"),
    pytest.param("spawn", REDIS_URL, id="spawn-redis"),
    pytest.param("fork", RABBITMQ_URL, id="fork-amqp"),
])
def test_killed_child_fails_each_of_its_jobs_and_leaves_the_other_child(worker_factory, method,
                                                                        broker):
    with slot_worker(worker_factory, slots=6, processes=2, method=method,
                     broker=broker) as worker:
        children = worker.wait_for_children(2)
        running = [worker.send(ts.span, 5) for _ in range(6)]
        eventually(lambda: _inspect_active(worker) == 6, 10, "six running")
        victim = children[0]
        os.kill(victim, signal.SIGKILL)
        lost, kept = 0, 0
        for result in running:
            try:
                assert result.get(timeout=30)["child"] != victim
                kept += 1
            except WorkerLostError:
                lost += 1
        assert (lost, kept) == (3, 3)
        now = worker.wait_for_children(2)
        assert victim not in now and children[1] in now


# --- row 14: max_tasks_per_child with several slots -----------------------------------------

@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_max_tasks_per_child_replaces_children_without_a_stall_or_a_lost_task(
        worker_factory, method):
    with slot_worker(worker_factory, slots=6, processes=2, method=method,
                     args=("--max-tasks-per-child", "5")) as worker:
        first = worker.wait_for_children(2)
        started = time.monotonic()
        results = [worker.send(ts.span, 0.2) for _ in range(40)]
        done = [r.get(timeout=60) for r in results]
        elapsed = time.monotonic() - started
        seen = {d["child"] for d in done}
        assert len(seen) >= 6 and not set(first) >= seen, "children were replaced"
        assert elapsed < 20, f"40 short tasks took {elapsed:.1f}s: a recycle stalled"
        assert len(worker.wait_for_children(2)) == 2


def test_max_tasks_per_child_counts_the_tasks_in_flight_too(worker_factory):
    """4 slots and at most 3 tasks: a child is sent 3, however many slots are free."""
    with slot_worker(worker_factory, slots=8, processes=2,
                     args=("--max-tasks-per-child", "3")) as worker:
        done = [r.get(timeout=60) for r in [worker.send(ts.span, 0.3) for _ in range(24)]]
        per_child = collections.Counter(d["child"] for d in done)
        assert max(per_child.values()) <= 3, per_child
        assert len(per_child) >= 8, per_child
        assert len(worker.wait_for_children(2)) == 2


def test_a_retry_waits_for_its_first_run_so_success_is_stored_last(worker_factory):
    """On prefork the retried run may finish before the first run stores RETRY, which then
    overwrites SUCCESS; with free slots here, it would run at once. It waits instead."""
    with slot_worker(worker_factory, slots=4, processes=2) as worker:
        sent = time.time()
        result = worker.send(ts.retry_then_linger, 1.5)
        done = result.get(timeout=30)
        assert done["start"] - sent >= 1.5, "the retried run started before the first ended"
        time.sleep(1)  # a late RETRY would land by now
        meta = json.loads(redis.Redis.from_url(BACKEND_URL).get(f"celery-task-meta-{result.id}"))
        assert meta["status"] == "SUCCESS", meta


# --- rows 16-18: prefetch, inspect stats and active --------------------------------------------

@pytest.mark.parametrize("processes", [2, 6], ids=["3-slots", "1-slot"])
def test_prefetch_stats_and_active_count_slots(worker_factory, processes):
    per_child = 6 // processes
    with slot_worker(worker_factory, slots=6, processes=processes,
                     conf={"worker_prefetch_multiplier": 3}) as worker:
        children = worker.wait_for_children(processes)
        running = [worker.send(ts.db_span, 3) for _ in range(6)]
        eventually(lambda: _inspect_active(worker) == 6, 10, "every slot busy")
        time.sleep(1.5)  # a snapshot from each child
        stats = app.control.inspect(destination=[worker.hostname], timeout=5).stats()
        mine = stats[worker.hostname]
        assert mine["prefetch_count"] == 18, "prefetch = slots x multiplier"
        pool = mine["pool"]
        assert pool["max-concurrency"] == 6 and sorted(pool["processes"]) == children
        per_pid = {c["pid"]: c for c in pool["asyncsql"]["children"]}
        assert set(per_pid) == set(children)
        for child in per_pid.values():
            assert child["slots"] == per_child and child["in-flight"] == per_child
            assert child["engines"]["default"]["checked_out"] == per_child
            assert child["snapshot-age-s"] < 2
        assert pool["asyncsql"]["connection-budget"] == {"default": 6}
        [r.get(timeout=20) for r in running]


# --- row 17: pool_grow / pool_shrink and --autoscale in slot units ----------------------------

def _stats(worker) -> dict:
    return app.control.inspect(destination=[worker.hostname], timeout=2).stats()[worker.hostname]


def _control(worker, command, n):
    replies = getattr(app.control, command)(n, destination=[worker.hostname], reply=True,
                                            timeout=5)
    assert replies and "ok" in replies[0][worker.hostname], replies


def test_pool_shrink_and_grow_move_the_slots_in_use_not_the_children(worker_factory):
    with slot_worker(worker_factory, slots=6, processes=2) as worker:
        children = worker.wait_for_children(2)
        prefetch = _stats(worker)["prefetch_count"]
        _control(worker, "pool_shrink", 4)
        mine = _stats(worker)
        assert mine["pool"]["max-concurrency"] == 2
        assert mine["prefetch_count"] == prefetch // 3, "prefetch follows the slots in use"
        done = [r.get(timeout=30) for r in [worker.send(ts.span, 1) for _ in range(6)]]
        assert most_at_once([(d["start"], d["end"]) for d in done]) == 2
        _control(worker, "pool_grow", 4)
        assert _stats(worker)["pool"]["max-concurrency"] == 6
        done = [r.get(timeout=30) for r in [worker.send(ts.span, 1) for _ in range(6)]]
        assert most_at_once([(d["start"], d["end"]) for d in done]) == 6
        assert worker.children() == children, "no child was started or stopped"


def test_pool_grow_past_the_slots_started_with_adds_a_child_and_shrink_retires_it(
        worker_factory):
    with slot_worker(worker_factory, slots=8, processes=2) as worker:
        children = worker.wait_for_children(2)
        _control(worker, "pool_grow", 2)
        grown = worker.wait_for_children(3)
        assert set(children) < set(grown), "a third child joined the two"
        eventually(lambda: len(_reporting_children(worker)) == 3, 20, "the third child up")
        pool = _stats(worker)["pool"]
        assert pool["max-concurrency"] == 10
        done = [r.get(timeout=30) for r in [worker.send(ts.db_span, 1.5) for _ in range(10)]]
        assert most_at_once([(d["start"], d["end"]) for d in done]) == 10, \
            "10 tasks ran at once, as on prefork grown by 2"
        assert "10 slots now, run by 3 children of 4 slot(s)" in worker.logs()
        _control(worker, "pool_shrink", 2)
        assert len(worker.wait_for_children(2)) == 2, "the child grown for is retired"
        done = [r.get(timeout=30) for r in [worker.send(ts.span, 1) for _ in range(10)]]
        assert most_at_once([(d["start"], d["end"]) for d in done]) == 8


def test_autoscale_lays_out_children_for_the_maximum_and_moves_only_the_limit(worker_factory):
    with slot_worker(worker_factory, slots=0, processes=2, args=("--autoscale=8,2",),
                     env={"AUTOSCALE_KEEPALIVE": "2"}) as worker:
        children = worker.wait_for_children(2)
        pool = _stats(worker)["pool"]
        assert pool["max-concurrency"] == 2, "the dispatch limit starts at the minimum"
        assert (pool["asyncsql"]["processes"], pool["asyncsql"]["slots-per-process"]) == (2, 4)
        assert all(c["slots"] == 4 and c["engines"]["default"]["size"] == 4
                   for c in pool["asyncsql"]["children"]), pool["asyncsql"]["children"]
        budget = sum(pool["asyncsql"]["connection-budget"].values())
        assert budget == 8
        burst = [worker.send(ts.db_span, 1.5) for _ in range(24)]
        samples, connections = [], []
        while not all(r.ready() for r in burst):
            pool = _stats(worker)["pool"]
            samples.append((pool["asyncsql"]["in-flight"], pool["max-concurrency"]))
            connections.append(pg_connections(worker.app_name))
        done = [r.get(timeout=60) for r in burst]
        assert all(in_flight <= limit for in_flight, limit in samples), samples
        assert 2 < most_at_once([(d["start"], d["end"]) for d in done]) <= 8
        assert max(limit for _, limit in samples) > 2, "the pool grew"
        assert max(connections) <= budget, connections
        eventually(lambda: _stats(worker)["pool"]["max-concurrency"] == 2, 30,
                   "shrunk back to the minimum after the keepalive")
        assert worker.children() == children, "no child was started or stopped"


# --- row 19: warm shutdown with every slot busy ------------------------------------------------

@pytest.mark.parametrize("broker", BROKERS)
def test_warm_shutdown_finishes_every_task_in_flight_and_closes_connections(
        worker_factory, broker):
    with slot_worker(worker_factory, slots=6, processes=2, conf={"task_acks_late": True},
                     broker=broker) as worker:
        worker.wait_for_children(2)
        running = [worker.send(ts.db_span, 2) for _ in range(6)]
        eventually(lambda: _inspect_active(worker) == 6, 10, "every slot busy")
        assert worker.stop() == 0
        assert all(r.get(timeout=10)["end"] for r in running)
        assert pg_connections(worker.app_name) == 0
        assert worker.queued() == 0, "acks_late acks flushed before the worker exited"


# --- row 20: cold shutdown with every slot busy ------------------------------------------------

@pytest.mark.parametrize("broker", BROKERS)
def test_cold_shutdown_cancels_tasks_in_flight_and_acks_late_ones_are_redelivered(
        worker_factory, broker):
    conf = {"task_acks_late": True}
    with slot_worker(worker_factory, slots=4, processes=2, conf=conf, broker=broker) as worker:
        running = [worker.send(ts.db_span, 3) for _ in range(4)]
        eventually(lambda: _inspect_active(worker) == 4, 10, "every slot busy")
        started, stopped_at = time.monotonic(), time.time()
        worker.stop(signal.SIGQUIT, timeout_s=30)
        # The tasks take 3 s; a hub left polling after the pool stopped would take 10 s.
        assert time.monotonic() - started < 3, "cold shutdown waited for the tasks or the hub"
        assert pg_connections(worker.app_name) == 0, "engines disposed on the way out"
        assert all(r.state == "PENDING" for r in running), "nothing stored for cancelled tasks"
    with worker_factory(concurrency=4, include=INCLUDE, conf={"asyncsql_processes": 2, **conf},
                        queue=worker.queue, broker=broker):
        done = [r.get(timeout=60) for r in running]
        assert all(d["start"] > stopped_at for d in done), "each redelivered task ran again"
