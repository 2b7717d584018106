"""Rows 9-13 of DESIGN.md section 4: lost children, time limits and revokes, as prefork.

Row 13 also runs with several slots per child (the last test).

One task per child (``-c 2``). Each test starts two tasks, one per child,
then interrupts one of them (SIGKILL, soft or hard limit, revoke with
terminate) and checks that only that task is hit (prefork also replaces its child). The
"as prefork" rows run the same test against stock prefork with the sync twin.

Tasks record each start in Redis (``tasks_limits.runs_key``), so a test knows
which child runs which task and whether a task ran at all. Stored results are
also watched on the result backend's pub/sub channel, which the Redis backend
publishes every stored state to: that is how "stored once" and "stays
REVOKED" are checked, rather than by a single read.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import pytest
import redis
from billiard.exceptions import WorkerLostError
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from . import tasks_limits as tl
from .app import app
from .conftest import eventually, pg_connections, pg_scalar

INCLUDE = "tests.integration.tasks,tests.integration.tasks_limits"

SLEEPERS = [
    pytest.param("asyncsql", tl.async_mark_sleep, id="asyncsql"),
    pytest.param("prefork", tl.sync_mark_sleep, id="prefork"),
]


# -- helpers -----------------------------------------------------------------

def _runs_client() -> redis.Redis:
    return redis.Redis.from_url(tl.RUNS_URL)


def new_tag() -> str:
    return uuid.uuid4().hex


def runs(tag: str) -> list[int]:
    """The pids of the children that started the task tagged ``tag``, in order."""
    with _runs_client() as client:
        return [int(pid) for pid in client.lrange(tl.runs_key(tag), 0, -1)]


def wait_for_runs(tag: str, count: int = 1, timeout_s: float = 30) -> list[int]:
    return eventually(lambda: (found := runs(tag)) and len(found) >= count and found,
                      timeout_s, f"{count} start(s) of the task tagged {tag}")


def active_pg_sleeps(worker) -> int:
    """``pg_sleep`` queries the server is running now for this worker's connections."""
    return int(pg_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
        "AND state = 'active' AND query LIKE %s", worker.app_name, "%pg_sleep%"))


def stored_status(task_id: str) -> str:
    """The state stored in the result backend now (never a cached read)."""
    return app.backend.get_task_meta(task_id, cache=False)["status"]


def wait_for_children_without(worker, gone: int, timeout_s: float = 30) -> list[int]:
    """Wait until the worker has 2 children again and ``gone`` is not one of them."""
    return eventually(lambda: (now := worker.children()) and len(now) == 2
                      and gone not in now and now,
                      timeout_s, f"child {gone} replaced; children now {worker.children()}")


def assert_child_kept_or_replaced(worker, pool, hit_pid, sibling_pid):
    """asyncsql cancels the one coroutine and keeps its child; prefork kills and replaces it."""
    if pool == "asyncsql":
        assert worker.children() == sorted({hit_pid, sibling_pid}), "no child was replaced"
    else:
        assert sibling_pid in wait_for_children_without(worker, hit_pid)


class StoredStates:
    """Every state the result backend stores for one task id, from its pub/sub channel.

    Subscribe before the task is sent; ``collect`` drains what was published.
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.metas: list[dict] = []
        self._client = redis.Redis.from_url(app.conf.result_backend)
        self._pubsub = self._client.pubsub()
        channel = app.backend.get_key_for_task(task_id)
        self._pubsub.subscribe(channel)
        eventually(lambda: (m := self._pubsub.get_message(timeout=0.5)) and m["type"] == "subscribe",
                   10, f"subscription to {channel!r}")

    def collect(self, for_s: float = 0.0) -> list[str]:
        deadline = time.monotonic() + for_s
        while True:
            message = self._pubsub.get_message(timeout=0.2)
            if message is not None and message["type"] == "message":
                self.metas.append(json.loads(message["data"]))
            elif message is None and time.monotonic() >= deadline:
                return [meta["status"] for meta in self.metas]

    def close(self) -> None:
        self._pubsub.close()
        self._client.close()

    def __enter__(self) -> StoredStates:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def start_on_both_children(worker, first, second):
    """Send two (task, tag, args, options) jobs and wait until each runs on its own child."""
    children = worker.wait_for_children(2)
    sent = []
    for task, tag, args, options in (first, second):
        sent.append((worker.send(task, tag, *args, **options), tag))
    pids = [wait_for_runs(tag)[0] for _, tag in sent]
    assert pids[0] != pids[1], f"both tasks ran on child {pids[0]}: one was queued behind it"
    assert set(pids) == set(children), (pids, children)
    return [result for result, _ in sent], pids, children


# -- row 9: a child killed while running a task ---------------------------------

@pytest.mark.parametrize("pool,task", SLEEPERS)
@pytest.mark.parametrize("redeliver", [False, True], ids=["worker-lost", "reject-on-worker-lost"])
def test_killed_child_fails_or_redelivers_only_its_task_and_is_respawned(
        worker_factory, pool, task, redeliver):
    conf = {"task_acks_late": True, "task_reject_on_worker_lost": True} if redeliver else {}
    with worker_factory(pool=pool, concurrency=2, conf=conf, include=INCLUDE) as worker:
        victim_tag, sibling_tag = new_tag(), new_tag()
        (victim, sibling), (victim_pid, sibling_pid), _ = start_on_both_children(
            worker, (task, victim_tag, (1.5,), {}), (task, sibling_tag, (1.5,), {}))

        os.kill(victim_pid, signal.SIGKILL)

        if redeliver:
            rerun_pid = victim.get(timeout=45)
            assert victim.state == "SUCCESS"
            assert runs(victim_tag) == [victim_pid, rerun_pid], "redelivered exactly once"
            assert rerun_pid != victim_pid
        else:
            with pytest.raises(WorkerLostError):
                victim.get(timeout=30)
            assert victim.state == "FAILURE"
            assert runs(victim_tag) == [victim_pid], "not run again"

        assert sibling.get(timeout=30) == sibling_pid, "the other child finished its own task"
        assert runs(sibling_tag) == [sibling_pid]
        children = wait_for_children_without(worker, victim_pid)
        assert sibling_pid in children, "the other child is untouched"
        # The respawned child takes work.
        tag = new_tag()
        assert worker.send(task, tag, 0).get(timeout=30) in children


# -- row 10: soft time limit ---------------------------------------------------

@pytest.mark.parametrize("pool,task,handler", [
    pytest.param("asyncsql", tl.async_mark_sleep, tl.async_mark_handles_soft, id="asyncsql"),
    pytest.param("prefork", tl.sync_mark_sleep, tl.sync_mark_handles_soft, id="prefork"),
])
def test_soft_time_limit_hits_only_its_task_and_keeps_the_child(
        worker_factory, pool, task, handler):
    with worker_factory(pool=pool, concurrency=2, include=INCLUDE) as worker:
        # Not handled: SoftTimeLimitExceeded is stored (limit from apply_async options).
        (limited, sibling), (limited_pid, sibling_pid), children = start_on_both_children(
            worker, (task, new_tag(), (60,), {"soft_time_limit": 1}),
            (task, new_tag(), (1.5,), {}))
        with pytest.raises(SoftTimeLimitExceeded):
            limited.get(timeout=20)
        assert limited.state == "FAILURE"
        assert sibling.get(timeout=20) == sibling_pid

        # Handled: the task's own value is its result (limit from the task's options).
        (handled, sibling), (handled_pid, sibling_pid), _ = start_on_both_children(
            worker, (handler, new_tag(), (60,), {}), (task, new_tag(), (1.5,), {}))
        value = handled.get(timeout=20)
        assert handled.state == "SUCCESS"
        if pool == "asyncsql":
            assert value.startswith("handled: "), value
            assert "soft time limit" in value, "the CancelledError message names the cause"
        else:
            assert value == "handled: SoftTimeLimitExceeded"
        assert sibling.get(timeout=20) == sibling_pid

        # Neither interrupted child was replaced, and both still take work.
        assert worker.children() == children
        assert {limited_pid, handled_pid} <= set(children)
        pair = [worker.send(task, new_tag(), 0.5) for _ in range(2)]
        assert {result.get(timeout=20) for result in pair} == set(children)
        assert worker.children() == children


def test_soft_limit_mid_query_leaves_the_child_and_its_connections_usable(worker_factory):
    with worker_factory(pool="asyncsql", concurrency=2, include=INCLUDE) as worker:
        children = worker.wait_for_children(2)
        tag = new_tag()
        limited = worker.send(tl.async_session_sleep, tag, 4, soft_time_limit=1.5)
        sibling = worker.send(tl.async_session_pid, 2)
        limited_pid = wait_for_runs(tag)[0]
        eventually(lambda: active_pg_sleeps(worker) == 1, 1.5,
                   "the pg_sleep query running before the soft limit", interval_s=0.05)
        with pytest.raises(SoftTimeLimitExceeded):
            limited.get(timeout=20)
        cancelled_at = time.monotonic()
        assert sibling.get(timeout=20)["child"] != limited_pid

        # The server-side query goes away with the cancelled coroutine...
        eventually(lambda: active_pg_sleeps(worker) == 0, 3,
                   "the cancelled pg_sleep query ended on the server")

        # ...and both children, the interrupted one included, query again,
        # never holding more than one connection each, for as long as the
        # pg_sleep would still have run.
        seen_children, most = set(), 0
        while time.monotonic() < cancelled_at + 3 or seen_children != set(children):
            pair = [worker.send(tl.async_session_pid, 0.5) for _ in range(2)]
            while not all(r.ready() for r in pair):
                most = max(most, pg_connections(worker.app_name))
                time.sleep(0.05)
            seen_children |= {r.get(timeout=1)["child"] for r in pair}
            assert time.monotonic() < cancelled_at + 30, f"children seen {seen_children}"
        assert seen_children == set(children)
        assert limited_pid in seen_children
        assert most <= 2, f"{most} connections for 2 children of one slot each"
        assert worker.children() == children


def test_soft_limit_reaches_a_sync_task_waiting_on_an_async_body(worker_factory):
    """A sync task blocked on the loop gets its soft limit when it passes, not when the body
    ends; the body is cancelled at its ``await`` and the child goes on."""
    with worker_factory(pool="asyncsql", concurrency=2, include=INCLUDE) as worker:
        sent_at = time.monotonic()
        limited = worker.send(tl.sync_waits_on_async_body, new_tag(), 30)
        with pytest.raises(SoftTimeLimitExceeded):
            limited.get(timeout=40)
        assert time.monotonic() - sent_at < 15, "the limit waited for the 30 s body"
        children = worker.children()
        assert worker.send(tl.async_mark_sleep, new_tag(), 0.1).get(timeout=20) in children


# -- row 11: hard time limit ---------------------------------------------------

@pytest.mark.parametrize("pool,task", SLEEPERS)
def test_hard_time_limit_is_stored_once_and_hits_only_its_task(worker_factory, pool, task):
    with worker_factory(pool=pool, concurrency=2, include=INCLUDE) as worker:
        task_id = str(uuid.uuid4())
        with StoredStates(task_id) as stored:
            (limited, sibling), (limited_pid, sibling_pid), _ = start_on_both_children(
                worker, (task, new_tag(), (60,), {"time_limit": 1, "task_id": task_id}),
                (task, new_tag(), (2,), {}))
            with pytest.raises(TimeLimitExceeded):
                limited.get(timeout=20)
            assert sibling.get(timeout=20) == sibling_pid
            assert_child_kept_or_replaced(worker, pool, limited_pid, sibling_pid)
            stored.collect(for_s=0.5)
        # One outcome: TimeLimitExceeded, never replaced by what the killed child
        # might report (WorkerLostError, SystemExit, a cancelled coroutine's
        # error). Celery 5.7 itself writes that same outcome twice on prefork
        # (Request.on_timeout, then on_failure from the pool's error callback).
        outcomes = {(meta["status"], meta["result"]["exc_type"]) for meta in stored.metas}
        assert outcomes == {("FAILURE", "TimeLimitExceeded")}, stored.metas
        if pool == "asyncsql":
            assert len(stored.metas) == 1, stored.metas  # the pool stores it once
        else:
            assert 1 <= len(stored.metas) <= 2, stored.metas
        assert stored_status(task_id) == "FAILURE"


# -- row 12: revoke with terminate -------------------------------------------

@pytest.mark.parametrize("pool,task", SLEEPERS)
def test_revoke_terminate_revokes_only_its_task_for_good(worker_factory, pool, task):
    with worker_factory(pool=pool, concurrency=2, include=INCLUDE) as worker:
        for sig in ("SIGTERM", "SIGKILL"):
            task_id = str(uuid.uuid4())
            with StoredStates(task_id) as stored:
                (target, sibling), (target_pid, sibling_pid), _ = start_on_both_children(
                    worker, (task, new_tag(), (60,), {"task_id": task_id}),
                    (task, new_tag(), (1.5,), {}))
                replies = app.control.revoke(task_id, terminate=True, signal=sig,
                                             destination=[worker.hostname], reply=True,
                                             timeout=10)
                assert replies, f"{sig}: the worker answered the revoke"
                eventually(lambda task_id=task_id: stored_status(task_id) == "REVOKED", 20,
                           f"{sig}: target REVOKED")
                assert target.state == "REVOKED"
                assert sibling.get(timeout=20) == sibling_pid, f"{sig}: sibling succeeded"
                assert_child_kept_or_replaced(worker, pool, target_pid, sibling_pid)
                states = stored.collect(for_s=1)
            assert states and set(states) == {"REVOKED"}, (sig, stored.metas)
            assert stored_status(task_id) == "REVOKED", f"{sig}: still REVOKED later"


# -- row 13: revoked before it starts --------------------------------------------

@pytest.mark.parametrize("pool,task", SLEEPERS)
def test_task_revoked_before_it_starts_never_runs(worker_factory, pool, task):
    with worker_factory(pool=pool, concurrency=2, include=INCLUDE) as worker:
        worker.wait_for_children(2)

        # Revoked before it is even sent.
        early_id, early_tag = str(uuid.uuid4()), new_tag()
        assert app.control.revoke(early_id, destination=[worker.hostname], reply=True, timeout=10)
        early = worker.send(task, early_tag, 0, task_id=early_id)

        # Sent while both children are busy, revoked while it waits.
        (busy_a, busy_b), _, _ = start_on_both_children(
            worker, (task, new_tag(), (1.5,), {}), (task, new_tag(), (1.5,), {}))
        waiting_id, waiting_tag = str(uuid.uuid4()), new_tag()
        waiting = worker.send(task, waiting_tag, 0, task_id=waiting_id)
        assert app.control.revoke(waiting_id, destination=[worker.hostname], reply=True, timeout=10)

        busy_a.get(timeout=20)
        busy_b.get(timeout=20)
        for task_id in (early_id, waiting_id):
            eventually(lambda task_id=task_id: stored_status(task_id) == "REVOKED", 20,
                       f"{task_id} REVOKED")
        # Later work runs, and still neither revoked task has.
        assert worker.send(task, new_tag(), 0).get(timeout=20)
        assert runs(early_tag) == [] and runs(waiting_tag) == []
        assert early.state == waiting.state == "REVOKED"


def test_task_revoked_before_it_starts_never_runs_while_its_siblings_do(worker_factory):
    """Row 13 with several slots per child: 8 slots on 2 children, every one busy."""
    with worker_factory(concurrency=8, include=INCLUDE,
                        conf={"asyncsql_processes": 2}) as worker:
        children = worker.wait_for_children(2)
        early_id, early_tag = str(uuid.uuid4()), new_tag()
        assert app.control.revoke(early_id, destination=[worker.hostname], reply=True, timeout=10)
        early = worker.send(tl.async_mark_sleep, early_tag, 0, task_id=early_id)

        busy_tags = [new_tag() for _ in range(8)]
        busy = [worker.send(tl.async_mark_sleep, tag, 3) for tag in busy_tags]
        started = [wait_for_runs(tag)[0] for tag in busy_tags]
        assert sorted(started.count(child) for child in children) == [4, 4], started

        waiting_id, waiting_tag = str(uuid.uuid4()), new_tag()
        sibling_tags = [new_tag() for _ in range(3)]
        queued = [worker.send(tl.async_mark_sleep, sibling_tags[0], 0),
                  worker.send(tl.async_mark_sleep, waiting_tag, 0, task_id=waiting_id),
                  *[worker.send(tl.async_mark_sleep, tag, 0) for tag in sibling_tags[1:]]]
        assert app.control.revoke(waiting_id, destination=[worker.hostname], reply=True, timeout=10)
        assert runs(waiting_tag) == [], "revoked while it waited for a slot"

        assert sorted(set(r.get(timeout=30) for r in busy)) == children, "busy siblings done"
        for result in (queued[0], *queued[2:]):
            assert result.get(timeout=30) in children, "queued siblings ran"
        for task_id in (early_id, waiting_id):
            eventually(lambda task_id=task_id: stored_status(task_id) == "REVOKED", 20,
                       f"{task_id} REVOKED")
        assert worker.send(tl.async_mark_sleep, new_tag(), 0).get(timeout=20) in children
        assert runs(early_tag) == [] and runs(waiting_tag) == []
        assert all(runs(tag) for tag in sibling_tags)
        assert early.state == queued[1].state == "REVOKED"
        assert worker.children() == children, "revoking a task that never ran kills no child"
