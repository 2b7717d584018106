"""Rows 1, 2 and 4 of DESIGN.md: selection, results, one loop and few connections per child."""

import pytest

from . import tasks
from .app import app
from .conftest import pg_connections


def test_cli_option_starts_the_pool_and_inspect_names_it(worker_factory):
    with worker_factory(pool="asyncsql", concurrency=2) as worker:
        assert worker.send(tasks.async_add, 2, 3).get(timeout=20) == 5
        stats = app.control.inspect(destination=[worker.hostname], timeout=5).stats()
        pool = stats[worker.hostname]["pool"]
        assert pool["implementation"] == "celery_asyncpool.pool:TaskPool"
        assert pool["asyncsql"]["processes"] == 2


@pytest.mark.parametrize("setting", ["asyncsql", "celery_asyncpool.pool:TaskPool"])
def test_worker_pool_setting_starts_the_pool(worker_factory, setting):
    with worker_factory(pool="", conf={"worker_pool": setting}) as worker:
        assert worker.send(tasks.async_add, 1, 1).get(timeout=20) == 2
        stats = app.control.inspect(destination=[worker.hostname], timeout=5).stats()
        assert stats[worker.hostname]["pool"]["implementation"] == "celery_asyncpool.pool:TaskPool"


def test_sync_tasks_run_as_before_and_off_the_loop(worker_factory):
    with worker_factory() as worker:
        assert worker.send(tasks.sync_add, 2, 2).get(timeout=20) == 4
        where = worker.send(tasks.sync_where).get(timeout=20)
        # Never on the child's loop thread: one at a time, on a thread of their own.
        assert where["thread"] != "MainThread" and not where["loop_running"]
        assert where["pid"] in worker.children()


@pytest.mark.parametrize("pool,task", [("asyncsql", tasks.async_unserializable),
                                       ("prefork", tasks.sync_unserializable)])
def test_unserializable_result_fails_as_on_prefork(worker_factory, pool, task):
    with worker_factory(pool=pool) as worker:
        result = worker.send(task)
        with pytest.raises(Exception) as caught:
            result.get(timeout=20)
        assert result.state == "FAILURE"
    assert "EncodeError" in type(caught.value).__name__ or "serializ" in str(caught.value)


def test_one_loop_and_few_reused_connections_per_child(worker_factory):
    with worker_factory(concurrency=2) as worker:
        results = [worker.send(tasks.backend_pid) for _ in range(60)]
        seen = [r.get(timeout=30) for r in results]
        children = worker.children()
        assert len(children) == 2
        by_child = {}
        for item in seen:
            assert item["thread"] == "MainThread"  # the child drives its loop itself
            by_child.setdefault(item["child"], set()).add((item["loop"], item["backend"]))
        assert set(by_child) <= set(children)
        for pairs in by_child.values():
            assert len(pairs) == 1, "one loop and one reused connection per child"
        assert pg_connections(worker.app_name) <= 2
    assert pg_connections(worker.app_name) == 0
