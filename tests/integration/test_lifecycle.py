"""Rows 1 (rest), 14, 15, 19, 20, 22 and 23 of DESIGN.md: how children and workers live and die.

Rows 15 and 23 also run with several slots per child (``asyncsql_processes`` fixed).

Where the row says "as prefork", the same test runs against stock prefork with a
sync twin of the task, and both must behave alike.
"""

import json
import signal
import socket
import sys
import time
import uuid
from collections import Counter

import psutil
import psycopg
import pytest
import redis
from celery import Celery

from celery_asyncpool.pytest_plugin import start_worker

from . import tasks, tasks_lifecycle
from .app import app, app_module_pid
from .conftest import PG_DSN, REDIS_URL, ROOT, Worker, eventually, pg_connections

INCLUDE = "tests.integration.tasks,tests.integration.tasks_lifecycle"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
ASYNC_ADD = "tests.integration.tasks.async_add"
BACKEND_PID = "tests.integration.tasks.backend_pid"


# --- helpers -----------------------------------------------------------------------------------

def pg_rows(sql, *params):
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def pg_execute(sql):
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(sql)


def backends(app_name):
    """PostgreSQL backend pid -> state, for one application_name."""
    return dict(pg_rows("SELECT pid, state FROM pg_stat_activity WHERE application_name = %s",
                        app_name))


def broker_redis():
    return redis.Redis.from_url(REDIS_URL)


def unacked_task_ids():
    """Task ids of the messages kombu's Redis transport holds as delivered, not acked."""
    ids = set()
    for raw in broker_redis().hvals("unacked"):
        payload = json.loads(raw)[0]
        ids.add(payload.get("headers", {}).get("id"))
    return ids


def queued_messages(queue):
    client = broker_redis()
    return sum(client.llen(key) for key in client.scan_iter(match=f"{queue}*")
               if client.type(key) == b"list")


def assert_clean_log(worker):
    logs = worker.logs()
    for needle in ("different loop", "Traceback", "another operation is in progress",
                   "Exception terminating connection"):
        assert needle not in logs, f"{needle!r} in the worker log:\n{logs[-5000:]}"


@pytest.fixture
def table():
    """A table for side effects: one row per task run."""
    name = f"lifecycle_{uuid.uuid4().hex[:12]}"
    pg_execute(f"CREATE TABLE {name} (token text NOT NULL, pid integer NOT NULL)")
    yield name
    pg_execute(f"DROP TABLE IF EXISTS {name}")


# --- row 14: worker_max_tasks_per_child ----------------------------------------------------

@pytest.mark.parametrize("pool,task", [("asyncsql", tasks_lifecycle.record),
                                       ("prefork", tasks_lifecycle.sync_record)])
def test_max_tasks_per_child_replaces_children_and_runs_each_task_once(
        worker_factory, table, pool, task):
    limit, count = 3, 15
    with worker_factory(pool=pool, concurrency=2, include=INCLUDE,
                        args=("--max-tasks-per-child", str(limit))) as worker:
        worker.wait_for_children(2)
        tokens = [uuid.uuid4().hex for _ in range(count)]
        results = [worker.send(task, table, token, 0.05) for token in tokens]
        pids = [result.get(timeout=90) for result in results]
        assert [result.state for result in results] == ["SUCCESS"] * count

        # Nothing lost, nothing run twice: one row per task, written by the child it names.
        rows = pg_rows(f"SELECT token, pid FROM {table}")
        assert sorted(token for token, _ in rows) == sorted(tokens)
        assert dict(rows) == dict(zip(tokens, pids))

        # Each child ran at most `limit` tasks; those that ran `limit` were replaced.
        per_child = Counter(pids)
        assert max(per_child.values()) <= limit, per_child
        assert len(per_child) >= count // limit, per_child
        retired = {pid for pid, n in per_child.items() if n == limit}
        assert len(retired) >= count // limit - 1, per_child

        def replaced():
            children = set(worker.children())
            return len(children) == 2 and not children & retired and children
        children = eventually(replaced, what="retired children replaced")
        assert {pid for pid, n in per_child.items() if n < limit} <= children

        # The pool still runs tasks after the turnover, in one of the children it has now
        # (which may then retire in turn, if that task was its third).
        assert worker.send(task, table, uuid.uuid4().hex, 0).get(timeout=30) in children

        if pool == "asyncsql":
            # Each retired child disposed its engine on the way out; the worker is within
            # its budget of one connection per child.
            eventually(lambda: pg_connections(worker.app_name) <= 2, timeout_s=15,
                       what="connections back within budget")
            def disposed():
                logs = worker.logs()
                return all(f"lifecycle-pool-close pid={pid}" in logs for pid in retired)
            eventually(disposed, timeout_s=15, what="each retired child disposing its engine")
            assert_clean_log(worker)
    assert pg_connections(worker.app_name) == 0


# --- row 15: worker_max_memory_per_child ---------------------------------------------------

LIMIT_KB = 250_000


@pytest.mark.parametrize("pool,allocate,whoami", [
    ("asyncsql", tasks.allocate_mb, tasks.child_pid),
    ("prefork", tasks_lifecycle.sync_allocate_mb, tasks.sync_child_pid),
])
def test_max_memory_per_child_replaces_the_child_after_its_task(
        worker_factory, pool, allocate, whoami):
    with worker_factory(pool=pool, concurrency=1, include=INCLUDE,
                        conf={"worker_max_memory_per_child": LIMIT_KB}) as worker:
        [child] = worker.wait_for_children(1)
        assert psutil.Process(child).memory_info().rss // 1024 < LIMIT_KB // 2
        # Below the limit the child stays.
        assert worker.send(whoami).get(timeout=30) == child
        assert worker.send(whoami).get(timeout=30) == child

        big = worker.send(allocate, 300)
        after = worker.send(whoami)
        assert big.get(timeout=60) == child
        assert big.state == "SUCCESS"
        replacement = after.get(timeout=60)
        assert replacement != child
        eventually(lambda: worker.children() == [replacement], what="one child, the new one")
        assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"
        assert worker.send(whoami).get(timeout=30) == replacement


def test_max_memory_per_child_with_several_slots_drains_the_siblings_before_it_exits(
        worker_factory):
    conf = {"worker_max_memory_per_child": LIMIT_KB, "asyncsql_processes": 1}
    with worker_factory(concurrency=4, include=INCLUDE, conf=conf) as worker:
        [child] = worker.wait_for_children(1)
        siblings = [worker.send(tasks_lifecycle.db_sleep, 4) for _ in range(3)]
        eventually(lambda: _active(worker) == 3, 15, "three siblings running")
        big = worker.send(tasks.allocate_mb, 300)
        assert big.get(timeout=60) == child
        over_at = time.time()
        after = worker.send(tasks.child_pid)
        done = [sibling.get(timeout=60) for sibling in siblings]
        assert [d["child"] for d in done] == [child] * 3, "the siblings finished in their child"
        assert all(d["finished"] > over_at for d in done), "they ran on after the limit was hit"
        replacement = after.get(timeout=60)
        assert replacement != child, "no new work went to the draining child"
        eventually(lambda: worker.children() == [replacement], what="one child, the new one")
        assert "drains and will be replaced" in worker.logs()
        assert_clean_log(worker)


def _active(worker) -> int:
    active = app.control.inspect(destination=[worker.hostname], timeout=2).active() or {}
    return len(active.get(worker.hostname, []))


# --- row 19: warm shutdown with tasks in flight ------------------------------------------------

@pytest.mark.parametrize("pool,task", [("asyncsql", tasks_lifecycle.db_sleep),
                                       ("prefork", tasks_lifecycle.sync_timed_sleep)])
def test_warm_shutdown_finishes_and_acks_tasks_in_flight(worker_factory, pool, task):
    conf = {"task_acks_late": True, "task_track_started": True}
    with worker_factory(pool=pool, concurrency=2, include=INCLUDE, conf=conf) as worker:
        children = worker.wait_for_children(2)
        results = [worker.send(task, 6) for _ in range(2)]
        ids = {result.id for result in results}
        eventually(lambda: all(r.state == "STARTED" for r in results), what="both tasks started")
        if pool == "asyncsql":
            eventually(lambda: pg_connections(worker.app_name) == 2,
                       what="both tasks holding a connection")
        assert ids <= unacked_task_ids(), "acks_late: in flight means not acked yet"

        sigterm_at = time.time()
        assert worker.stop(signal.SIGTERM, timeout_s=60) == 0

    values = [result.get(timeout=10) for result in results]
    assert [result.state for result in results] == ["SUCCESS", "SUCCESS"]
    assert sorted(value["child"] for value in values) == children
    for value in values:
        assert value["started"] < sigterm_at < value["finished"]
        assert value["finished"] - value["started"] >= 6
    assert not ids & unacked_task_ids(), "every task acked"
    assert queued_messages(worker.queue) == 0, "nothing requeued"
    if pool == "asyncsql":
        eventually(lambda: pg_connections(worker.app_name) == 0, timeout_s=5,
                   what="no connections left")
        logs = worker.logs()
        for child in children:
            assert f"lifecycle-pool-close pid={child}" in logs, "engine disposed by its child"
        assert_clean_log(worker)


# --- row 20: worker_soft_shutdown_timeout, then a cold shutdown -------------------------------

SOFT_SHUTDOWN_S = 3


def queued_task_ids(queue):
    return {json.loads(raw)["headers"]["id"] for raw in broker_redis().lrange(queue, 0, -1)}


@pytest.mark.parametrize("pool,processes,early,late", [
    pytest.param("asyncsql", 1, tasks_lifecycle.db_sleep, tasks_lifecycle.db_sleep_late,
                 id="asyncsql-4-slots"),
    pytest.param("asyncsql", 4, tasks_lifecycle.db_sleep, tasks_lifecycle.db_sleep_late,
                 id="asyncsql-1-slot"),
    pytest.param("prefork", 1, tasks_lifecycle.sync_timed_sleep,
                 tasks_lifecycle.sync_timed_sleep_late, id="prefork")])
def test_soft_shutdown_timeout_lets_short_tasks_finish_then_cancels_long_ones(
        worker_factory, pool, processes, early, late):
    conf = {"worker_soft_shutdown_timeout": SOFT_SHUTDOWN_S, "task_track_started": True,
            "asyncsql_processes": processes}  # four slots in one child, or one in each of four
    with worker_factory(pool=pool, concurrency=4, include=INCLUDE, conf=conf) as worker:
        short = [worker.send(early, 1), worker.send(late, 1)]
        long_early, long_late = worker.send(early, 60), worker.send(late, 60)
        everything = [*short, long_early, long_late]
        eventually(lambda: all(r.state == "STARTED" for r in everything), what="all started")
        if pool == "asyncsql":
            assert len({r.info["pid"] for r in everything}) == processes, "one child per process"
        sigquit_at = time.time()
        started = time.monotonic()
        worker.stop(signal.SIGQUIT, timeout_s=60)
        elapsed = time.monotonic() - started

    assert SOFT_SHUTDOWN_S <= elapsed < SOFT_SHUTDOWN_S + 15, elapsed
    # The short tasks finished within the timeout, were stored and acked.
    assert [r.state for r in short] == ["SUCCESS", "SUCCESS"], [r.info for r in short]
    for result in short:
        assert sigquit_at < result.info["finished"] < sigquit_at + SOFT_SHUTDOWN_S
    assert not {r.id for r in short} & (unacked_task_ids() | queued_task_ids(worker.queue))
    # The long ones were cancelled after it: the acks_late one is back in the queue, the
    # other is acked and marked for retry (Celery's "cancelled by Celery").
    assert long_early.state == "RETRY", long_early.info
    assert long_late.state == "STARTED"
    assert queued_task_ids(worker.queue) == {long_late.id}
    assert not unacked_task_ids() & {r.id for r in everything}
    if pool == "asyncsql":
        assert pg_connections(worker.app_name) == 0, "engines disposed"
        assert_clean_log(worker)


# --- row 22: children forked, or spawned as fresh interpreters --------------------------------

SPAWN_MAIN = "from billiard.spawn import spawn_main"


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_children_start_by_the_start_method_and_run_async_tasks(worker_factory, method):
    assert app.conf.worker_pool_start_method == "fork", "fork is the default"
    conf = {"worker_pool_start_method": method} if method == "spawn" else {}
    with worker_factory(concurrency=2, include=INCLUDE, conf=conf) as worker:
        children = worker.wait_for_children(2)
        parent_cmdline = psutil.Process(worker.pid).cmdline()
        for child in children:
            cmdline = psutil.Process(child).cmdline()
            if method == "fork":
                assert cmdline == parent_cmdline
            else:
                assert any(SPAWN_MAIN in part for part in cmdline), cmdline
        seen = [r.get(timeout=30) for r in [worker.send(tasks_lifecycle.fork_evidence)
                                             for _ in range(8)]]
        for item in seen:
            # Forked: the task module was imported once, in the parent, before the fork.
            # Spawned: each child imported it itself.
            assert item["import_pid"] == (worker.pid if method == "fork" else item["pid"])
            assert item["fresh_interpreter"] is (method == "spawn")
            assert item["ppid"] == worker.pid
            assert item["pid"] in children
            assert item["thread"] == "MainThread"
        assert worker.send(tasks.async_add, 20, 22).get(timeout=30) == 42
        # The -A module's own task, and a task on the child's engine.
        assert worker.send(app_module_pid).get(timeout=30) in children
        found = [r.get(timeout=30) for r in [worker.send(tasks.backend_pid) for _ in range(6)]]
        assert {item["child"] for item in found} <= set(children)
        # A user's engine built at import: in a spawned child, built there, and it works.
        probes = [r.get(timeout=30) for r in [worker.send(tasks_lifecycle.user_engine_probe)
                                              for _ in range(6)]]
        by_child = {}
        for item in probes:
            assert item["import_pid"] == (worker.pid if method == "fork" else item["child"])
            by_child.setdefault(item["child"], set()).add(item["backend"])
        assert all(len(backends) == 1 for backends in by_child.values()), by_child
        assert worker.stop(timeout_s=60) == 0
    assert pg_connections(worker.app_name) == 0
    assert pg_connections(f"{worker.app_name}-user") == 0
    assert_clean_log(worker)


# --- row 23: the user's own engine, built and used before fork ------------------------------

def test_user_engine_built_before_fork_is_replaced_and_parent_connection_survives(
        worker_factory, tmp_path):
    probe_file = tmp_path / "parent-probe.json"
    env = {"ITEST_PARENT_ENGINE": "1", "ITEST_PARENT_PROBE_FILE": str(probe_file)}
    with worker_factory(concurrency=2, include=INCLUDE, env=env,
                        args=("--max-tasks-per-child", "10")) as worker:
        user_app = f"{worker.app_name}-user"
        [(parent_backend, _)] = backends(user_app).items()

        results = [worker.send(tasks_lifecycle.user_engine_probe) for _ in range(30)]
        seen = [result.get(timeout=60) for result in results]
        by_child = {}
        for item in seen:
            assert item["import_pid"] == worker.pid
            assert item["child"] != worker.pid
            assert item["parent_backend"] == parent_backend
            assert item["parent_pool"] is not None
            assert item["pool"] != item["parent_pool"], "the child got a fresh pool"
            assert item["backend"] != parent_backend, "the child opened its own connection"
            by_child.setdefault(item["child"], set()).add(item["backend"])
        assert len(by_child) >= 3, "children were replaced along the way"
        for child_backends in by_child.values():
            assert len(child_backends) == 1, "one reused connection per child"

        # The parent's connection is untouched by children starting, working and exiting.
        eventually(lambda: not set(worker.children()) & {
            child for child in by_child if Counter(i["child"] for i in seen)[child] == 10},
            what="children that ran 10 tasks gone")
        assert backends(user_app).get(parent_backend) == "idle"
        assert_clean_log(worker)

    # At shutdown, after every child is gone, the parent used its pooled connection again.
    assert json.loads(probe_file.read_text()) == {
        "backend_before": parent_backend, "backend_after": parent_backend}


def test_user_engine_built_before_fork_serves_several_slots_per_child(worker_factory, tmp_path):
    probe_file = tmp_path / "parent-probe.json"
    env = {"ITEST_PARENT_ENGINE": "1", "ITEST_PARENT_PROBE_FILE": str(probe_file)}
    with worker_factory(concurrency=8, include=INCLUDE, env=env,
                        conf={"asyncsql_processes": 2},
                        args=("--max-tasks-per-child", "12")) as worker:
        user_app = f"{worker.app_name}-user"
        [(parent_backend, _)] = backends(user_app).items()

        results = [worker.send(tasks_lifecycle.user_engine_probe, 0.3) for _ in range(48)]
        seen = [result.get(timeout=90) for result in results]
        by_child = {}
        for item in seen:
            assert item["child"] != worker.pid
            assert item["parent_backend"] == parent_backend
            assert item["pool"] != item["parent_pool"], "the child got a fresh pool"
            assert item["backend"] != parent_backend, "the child opened its own connections"
            by_child.setdefault(item["child"], set()).add(item["backend"])
        assert len(by_child) >= 4, "children were replaced along the way"
        assert all(len(b) <= 4 for b in by_child.values()), "at most one connection per slot"
        assert max(len(b) for b in by_child.values()) > 1, "tasks used the engine at once"
        assert len(set().union(*by_child.values())) == sum(len(b) for b in by_child.values()), \
            "no connection crossed from one child to another"

        eventually(lambda: not set(worker.children()) & {
            child for child in by_child if Counter(i["child"] for i in seen)[child] == 12},
            what="children that ran 12 tasks gone")
        assert backends(user_app).get(parent_backend) == "idle"
        assert_clean_log(worker)

    assert json.loads(probe_file.read_text()) == {
        "backend_before": parent_backend, "backend_after": parent_backend}


# --- row 1: app.Worker from a script, the filesystem transport, RabbitMQ -----------------------

WORKER_SCRIPT = """\
import sys
sys.path.insert(0, {root!r})
from tests.integration.app import app
app.Worker(pool_cls="asyncsql", concurrency=2, queues=[{queue!r}], hostname={hostname!r},
           loglevel="INFO", without_gossip=True, without_mingle=True,
           without_heartbeat=True).start()
"""


def test_app_worker_from_a_script_starts_the_pool(tmp_path):
    queue = f"itest-{uuid.uuid4().hex[:10]}"
    hostname = f"{queue}@{socket.gethostname()}"
    script = tmp_path / "run_worker.py"
    script.write_text(WORKER_SCRIPT.format(root=str(ROOT), queue=queue, hostname=hostname))
    log_path = tmp_path / f"{queue}.log"
    env = {"ITEST_QUEUE": queue, "ITEST_APP_NAME": queue, "ITEST_INCLUDE": INCLUDE,
           "ITEST_CONF": "{}"}
    worker = start_worker([sys.executable, str(script)], hostname=hostname, log_path=log_path,
                          env=env, cwd=tmp_path, pythonpath=[str(ROOT)], worker_class=Worker,
                          queue=queue, app_name=queue)
    proc = worker.proc
    try:
        worker.wait_for_log(" ready.", timeout_s=60)
        assert worker.hostname == hostname
        assert worker.send(tasks.async_add, 2, 3).get(timeout=30) == 5
        found = [r.get(timeout=30) for r in [worker.send(tasks.backend_pid) for _ in range(4)]]
        assert {item["thread"] for item in found} == {"MainThread"}
        assert {item["child"] for item in found} <= set(worker.wait_for_children(2))
        stats = app.control.inspect(destination=[hostname], timeout=5).stats()
        pool = stats[hostname]["pool"]
        assert pool["implementation"] == "celery_asyncpool.pool:TaskPool"
        assert pool["asyncsql"]["processes"] == 2
        assert worker.stop(timeout_s=60) == 0
    finally:
        if proc.poll() is None:
            worker.kill()
    assert pg_connections(queue) == 0


def test_filesystem_transport_blocking_pool_runs_async_tasks(worker_factory, tmp_path):
    folder = tmp_path / "broker"
    control = tmp_path / "control"
    results = tmp_path / "results"
    for path in (folder, control, results):
        path.mkdir()
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder),
               "control_folder": str(control)}
    backend = f"file://{results}"
    env = {"ITEST_BROKER": "filesystem://", "ITEST_BACKEND": backend}
    client = Celery("itest-fs-client", broker="filesystem://", backend=backend)
    client.conf.broker_transport_options = options
    try:
        with worker_factory(concurrency=2, include=INCLUDE, env=env,
                            conf={"broker_transport_options": options}) as worker:
            sent = [client.send_task(ASYNC_ADD, args=(i, i), queue=worker.queue)
                    for i in range(6)]
            assert [r.get(timeout=60) for r in sent] == [2 * i for i in range(6)]
            found = [r.get(timeout=60) for r in [
                client.send_task(BACKEND_PID, queue=worker.queue) for _ in range(4)]]
            assert {item["thread"] for item in found} == {"MainThread"}
            assert {item["child"] for item in found} <= set(worker.children())
            stats = client.control.inspect(destination=[worker.hostname], timeout=10).stats()
            pool = stats[worker.hostname]["pool"]
            assert pool["implementation"] == "celery_asyncpool.pool:TaskPool"
            # Only Celery's AsynPool keeps write statistics: this is billiard's BlockingPool.
            assert pool["asyncsql"]["driver"] == "thread", "no event loop on this transport"
            assert sorted(pool["processes"]) == worker.children()
            assert worker.stop(timeout_s=60) == 0
        assert pg_connections(worker.app_name) == 0
    finally:
        client.close()


def test_rabbitmq_broker_runs_async_tasks(worker_factory):
    env = {"ITEST_BROKER": RABBITMQ_URL}
    client = Celery("itest-amqp-client", broker=RABBITMQ_URL, backend=app.conf.result_backend)
    queue = None
    try:
        with worker_factory(concurrency=2, include=INCLUDE, env=env) as worker:
            queue = worker.queue
            sent = [client.send_task(ASYNC_ADD, args=(i, 1), queue=queue) for i in range(6)]
            assert [r.get(timeout=60) for r in sent] == [i + 1 for i in range(6)]
            found = [r.get(timeout=60) for r in [
                client.send_task(BACKEND_PID, queue=queue) for _ in range(4)]]
            assert {item["thread"] for item in found} == {"MainThread"}
            assert {item["child"] for item in found} <= set(worker.children())
            stats = client.control.inspect(destination=[worker.hostname], timeout=5).stats()
            pool = stats[worker.hostname]["pool"]
            assert pool["implementation"] == "celery_asyncpool.pool:TaskPool"
            assert pool["asyncsql"]["driver"] == "hub", "the worker's event loop, as on Redis"
            assert stats[worker.hostname]["broker"]["transport"] == "amqp"
            assert worker.stop(timeout_s=60) == 0
        assert pg_connections(worker.app_name) == 0
    finally:
        if queue is not None:
            with client.connection_for_write() as conn:
                conn.default_channel.queue_delete(queue)
        client.close()
