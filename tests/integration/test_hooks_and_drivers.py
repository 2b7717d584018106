"""Child hooks, lazy engines, other drivers, and async tasks on pools that cannot run them."""

import time
import uuid

import pytest

from . import tasks, tasks_hooks
from .conftest import pg_connections, pg_scalar

INCLUDE = "tests.integration.tasks,tests.integration.tasks_hooks"


def test_hooks_run_on_the_childs_loop_at_start_and_stop(worker_factory):
    table = f"stops_{uuid.uuid4().hex[:8]}"
    pg_scalar(f"CREATE TABLE {table} (pid int)")
    try:
        with worker_factory(include=INCLUDE, env={"ITEST_STOP_TABLE": table}) as worker:
            states = [worker.send(tasks_hooks.hook_state).get(timeout=20) for _ in range(6)]
            children = worker.children()
            for state in states:
                assert state["started"] == {"pid": state["pid"], "loop": state["loop"]}
        assert sorted(r for r in _pids(table)) == children
        assert pg_connections(worker.app_name) == 0
    finally:
        pg_scalar(f"DROP TABLE {table}")


def _pids(table):
    import psycopg

    from .conftest import PG_DSN
    with psycopg.connect(PG_DSN) as conn:
        return [row[0] for row in conn.execute(f"SELECT pid FROM {table}")]


def test_a_failing_start_hook_is_logged_by_name_and_restarts_are_throttled(worker_factory):
    failure = "on_child_start hook tests.integration.tasks_hooks.remember_start failed; this child"
    with worker_factory(include=INCLUDE, env={"ITEST_FAIL_START_HOOK": "1"},
                        ready=False) as worker:
        worker.wait_for_log(failure)
        started = time.monotonic()
        time.sleep(4)
        failures = worker.logs().count(failure)
        assert "the start hook was told to fail" in worker.logs()
    children_per_second = 2 / 1.0  # two children, each waits a second before exiting
    assert failures <= 2 + children_per_second * (time.monotonic() - started) + 2


def test_an_absent_database_does_not_delay_start_and_fails_tasks_clearly(worker_factory):
    conf = {"asyncsql_database_url": "postgresql+asyncpg://postgres@127.0.0.1:1/test"}
    with worker_factory(conf=conf) as worker:
        assert worker.send(tasks.async_add, 1, 2).get(timeout=20) == 3
        result = worker.send(tasks.backend_pid)
        with pytest.raises(OSError):
            result.get(timeout=30)
        assert result.state == "FAILURE"


def test_psycopg_async_driver_works(worker_factory):
    conf = {"asyncsql_database_url": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
            "asyncsql_engine_options": {"connect_args": {"application_name": "itest-psycopg"}}}
    with worker_factory(conf=conf) as worker:
        pids = {worker.send(tasks.backend_pid).get(timeout=20)["backend"] for _ in range(10)}
        assert len(pids) <= 2


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_other_pools_fail_async_tasks_saying_to_use_asyncsql(worker_factory, pool):
    with worker_factory(pool=pool, concurrency=1) as worker:
        result = worker.send(tasks.async_add, 1, 2)
        with pytest.raises(Exception, match="start the worker with -P asyncsql"):
            result.get(timeout=20)
        assert worker.send(tasks.sync_add, 1, 2).get(timeout=20) == 3
        assert "are async def, which the" in worker.logs()
