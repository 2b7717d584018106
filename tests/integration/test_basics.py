"""Rows 1, 2 and 4 of DESIGN.md: selection, results, one loop and few connections per child.

The asyncsql tests run with one task slot per child and with four (``LAYOUTS``).
"""

import pytest

from . import tasks
from .app import app
from .conftest import pg_connections

# (-c, asyncsql_processes): two children with one slot each, or four slots each.
LAYOUTS = [pytest.param((2, 2), id="1-slot"), pytest.param((8, 2), id="4-slots")]


def layout_worker(worker_factory, layout, **kwargs):
    concurrency, processes = layout
    conf = {"asyncsql_processes": processes, **kwargs.pop("conf", {})}
    return worker_factory(concurrency=concurrency, conf=conf, **kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cli_option_starts_the_pool_and_inspect_names_it(worker_factory, layout):
    with layout_worker(worker_factory, layout, pool="asyncsql") as worker:
        assert worker.send(tasks.async_add, 2, 3).get(timeout=20) == 5
        stats = app.control.inspect(destination=[worker.hostname], timeout=5).stats()
        pool = stats[worker.hostname]["pool"]
        assert pool["implementation"] == "celery_asyncpool.pool:TaskPool"
        assert pool["max-concurrency"] == layout[0]
        assert (pool["asyncsql"]["processes"], pool["asyncsql"]["slots-per-process"]) == \
            (2, layout[0] // 2)


@pytest.mark.parametrize("setting", ["asyncsql", "celery_asyncpool.pool:TaskPool"])
def test_worker_pool_setting_starts_the_pool(worker_factory, setting):
    with worker_factory(pool="", conf={"worker_pool": setting}) as worker:
        assert worker.send(tasks.async_add, 1, 1).get(timeout=20) == 2
        stats = app.control.inspect(destination=[worker.hostname], timeout=5).stats()
        assert stats[worker.hostname]["pool"]["implementation"] == "celery_asyncpool.pool:TaskPool"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sync_tasks_run_as_before_and_off_the_loop(worker_factory, layout):
    with layout_worker(worker_factory, layout) as worker:
        assert worker.send(tasks.sync_add, 2, 2).get(timeout=20) == 4
        where = worker.send(tasks.sync_where).get(timeout=20)
        # Never on the child's loop thread: one at a time, on a thread of their own.
        assert where["thread"] != "MainThread" and not where["loop_running"]
        assert where["pid"] in worker.children()


@pytest.mark.parametrize("pool,task,layout", [
    pytest.param("asyncsql", tasks.async_unserializable, (2, 2), id="asyncsql-1-slot"),
    pytest.param("asyncsql", tasks.async_unserializable, (8, 2), id="asyncsql-4-slots"),
    pytest.param("prefork", tasks.sync_unserializable, (2, 2), id="prefork"),
])
def test_unserializable_result_fails_as_on_prefork(worker_factory, pool, task, layout):
    with layout_worker(worker_factory, layout, pool=pool) as worker:
        result = worker.send(task)
        with pytest.raises(Exception) as caught:
            result.get(timeout=20)
        assert result.state == "FAILURE"
    assert "EncodeError" in type(caught.value).__name__ or "serializ" in str(caught.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_loop_and_few_reused_connections_per_child(worker_factory, layout):
    slots_per_child = layout[0] // 2
    with layout_worker(worker_factory, layout) as worker:
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
            assert len({loop for loop, _ in pairs}) == 1, "one loop per child"
            assert len({backend for _, backend in pairs}) <= slots_per_child, \
                "connections reused: at most one per slot"
        assert pg_connections(worker.app_name) <= layout[0]
    assert pg_connections(worker.app_name) == 0
