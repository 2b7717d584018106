"""A database result backend under -c 100, counted in the worker's connection budget
(DESIGN.md section 1), and within it.

Celery's database backend stores each result through its own sync SQLAlchemy
engine, from every child and from the parent. Its connections get an
application_name of their own, so the test counts them apart from the
children's asyncpg pools. The account reads each outcome from that backend.
"""

from __future__ import annotations

import uuid

import pytest
from celery.backends.database import DatabaseBackend

from tests.integration import tasks
from tests.integration.app import app

from .accounting import figure, publish, settle, wait_settled
from .sampling import Peak
from .tasks import INCLUDE, effect

pytestmark = pytest.mark.serial  # it takes 86 of PostgreSQL's 100 connections

BACKEND_URL = "postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/test"  # trust: unused
MASKED_URL = "postgresql+psycopg://postgres:***@127.0.0.1:5432/test"
ASYNC_TASKS, SYNC_TASKS = 2_000, 200


def _backend_conf(app_name: str) -> dict:
    return {"result_backend": f"db+{BACKEND_URL}", "asyncsql_processes": 2,
            "database_engine_options": {"connect_args": {"application_name": app_name}}}


@pytest.mark.timeout(300)
def test_a_database_result_backend_stays_within_the_stated_budget(worker_factory):
    queue = f"itest-{uuid.uuid4().hex[:10]}"
    results_name = f"{queue}-results"
    backend = DatabaseBackend(app=app, url=BACKEND_URL)
    run = uuid.uuid4().hex
    with worker_factory(concurrency=100, queue=queue, conf=_backend_conf(results_name),
                        include=f"{INCLUDE},tests.integration.tasks") as worker:
        stats = worker.inspect(timeout=5).stats()
        asyncsql = stats[worker.hostname]["pool"]["asyncsql"]
        budget = asyncsql["connection-budget"]
        assert budget == {"default": 80, "result-backend": 2 * 2 + 2}
        assert asyncsql["databases"]["result-backend"] == MASKED_URL
        with Peak(worker.app_name, results_name) as peak:
            async_ids = publish(worker, effect, ASYNC_TASKS, run, 0.05)
            sync_ids = [worker.send(tasks.sync_add, i, 1).id for i in range(SYNC_TASKS)]
            wait_settled(async_ids + sync_ids, timeout_s=240, backend=backend)
        worker.wait_for_log("database connections at most 86: 'default' 80 "
                            "(postgresql+asyncpg://postgres@127.0.0.1:5432/test), "
                            f"'result-backend' 6 ({MASKED_URL})")
        assert "hunter2" not in worker.logs()
    async_account = settle("db result backend at -c 100: async", async_ids, run=run,
                           backend=backend)
    sync_account = settle("db result backend at -c 100: sync", sync_ids, run=None,
                          backend=backend)
    figure("db result backend: peak connections / stated budget",
           f"results {peak.peaks[results_name]} / {budget['result-backend']}, "
           f"pools {peak.peaks[worker.app_name]} / {budget['default']}, "
           f"together {peak.total} / {sum(budget.values())}")
    assert async_account.missing == sync_account.missing == []
    assert (async_account.once, async_account.failed_total) == (ASYNC_TASKS, 0)
    assert (sync_account.once, sync_account.failed_total) == (SYNC_TASKS, 0)
    assert [backend.get_task_meta(i)["result"] for i in sync_ids] == [
        i + 1 for i in range(SYNC_TASKS)], "sync results stored"
    assert 0 < peak.peaks[results_name] <= budget["result-backend"], peak.peaks
    assert peak.peaks[worker.app_name] <= budget["default"], peak.peaks
    assert peak.total <= sum(budget.values())
