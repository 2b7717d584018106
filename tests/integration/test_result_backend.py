"""A database result backend counted in the worker's connection budget (DESIGN.md section 1).

Celery's database backend stores each result through its own sync SQLAlchemy
engine, from every child and from the parent. Its connections get an
application_name of their own, so the test counts them apart from the
children's asyncpg pools.
"""

from __future__ import annotations

import uuid

from celery.backends.database import DatabaseBackend

from . import tasks, tasks_slots as ts
from .app import app
from .conftest import ConnectionPeak
from .test_slots import slot_worker

BACKEND_URL = "postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/test"  # trust: unused
MASKED_URL = "postgresql+psycopg://postgres:***@127.0.0.1:5432/test"


def _backend_conf(app_name: str) -> dict:
    return {"result_backend": f"db+{BACKEND_URL}",
            "database_engine_options": {"connect_args": {"application_name": app_name}}}


def test_a_database_result_backend_stays_within_the_stated_budget(worker_factory):
    queue = f"itest-{uuid.uuid4().hex[:10]}"
    results_name = f"{queue}-results"
    backend = DatabaseBackend(app=app, url=BACKEND_URL)
    with slot_worker(worker_factory, slots=20, processes=2, queue=queue,
                     conf=_backend_conf(results_name)) as worker:
        stats = app.control.inspect(destination=[worker.hostname], timeout=5).stats()
        asyncsql = stats[worker.hostname]["pool"]["asyncsql"]
        budget = asyncsql["connection-budget"]
        assert budget == {"default": 20, "result-backend": 2 * 2 + 2}
        assert asyncsql["databases"]["result-backend"] == MASKED_URL
        with ConnectionPeak(worker.app_name, results_name) as peak:
            sent = [worker.send(ts.db_span, 0.05) for _ in range(200)]
            sent += [worker.send(tasks.sync_add, i, 1) for i in range(40)]
            done = [app.AsyncResult(r.id, backend=backend).get(timeout=120) for r in sent]
        assert all(d["end"] for d in done[:200]), "async results stored"
        assert done[200:] == [i + 1 for i in range(40)], "sync results stored"
        assert 0 < peak.peaks[results_name] <= budget["result-backend"], peak.peaks
        assert peak.peaks[worker.app_name] <= budget["default"], peak.peaks
        assert peak.total <= sum(budget.values())
        worker.wait_for_log(f"database connections at most 26: 'default' 20 "
                            f"(postgresql+asyncpg://postgres@127.0.0.1:5432/test), "
                            f"'result-backend' 6 ({MASKED_URL})")
        assert "hunter2" not in worker.logs()
