"""`celery asyncsql check`, and a worker's start-up warnings about its connection budget.

Bad settings and an unreachable database at start-up are in the fault suite
(tests/faults/test_configuration.py, test_database.py).
"""

import json
import os
import subprocess
import sys

from .conftest import ROOT, pg_scalar


# No worker listens on this broker: the check's fleet part finds no running workers, and
# judges the check's own budget alone (the suite's workers share the machine's PostgreSQL).
QUIET_BROKER = "redis://127.0.0.1:6379/11"


def celery(*args, conf=None, timeout=90):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ITEST_CONF": json.dumps(conf or {}),
           "ITEST_BROKER": QUIET_BROKER}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.integration.app", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_check_prints_settings_and_budget_and_connects():
    done = celery("asyncsql", "check", "-c", "7", conf={"asyncsql_processes": 3})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "processes: 3, task slots per process: 3" in done.stdout
    assert "connections: 3 per process, 9 in all" in done.stdout
    assert "connected, server max_connections = " in done.stdout


def test_check_fails_on_an_unreachable_database_without_leaking_the_password():
    done = celery("asyncsql", "check", conf={
        "asyncsql_database_url": "postgresql+asyncpg://postgres:hunter2@127.0.0.1:1/test"})
    assert done.returncode == 1
    assert "Database 'default' (postgresql+asyncpg://postgres:***@127.0.0.1:1/test) " \
           "cannot be reached" in done.stderr
    assert "hunter2" not in done.stdout + done.stderr


def test_check_fails_when_the_budget_exceeds_max_connections():
    done = celery("asyncsql", "check", "-c", "2",
                  conf={"asyncsql_engine_options": {"pool_size": 1000}})
    assert done.returncode == 1
    assert "above the server's max_connections" in done.stderr


def _tipping_conf(with_backend: bool) -> dict:
    """One child whose pool leaves 3 of max_connections free; the backend needs 2 + 2 more."""
    limit = int(pg_scalar("SHOW max_connections"))
    conf = {"asyncsql_processes": 1, "asyncsql_connection_cap": limit,
            "asyncsql_engine_options": {"pool_size": limit - 3}}
    if with_backend:
        conf["result_backend"] = "db+postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/test"
    return conf


def test_check_counts_a_database_result_backend_on_the_same_server():
    limit = int(pg_scalar("SHOW max_connections"))
    assert celery("asyncsql", "check", "-c", "2", conf=_tipping_conf(False)).returncode == 0
    done = celery("asyncsql", "check", "-c", "2", conf=_tipping_conf(True))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "result backend: postgresql+psycopg://postgres:***@127.0.0.1:5432/test" in done.stdout
    assert "  connections: 4 in all (children and parent)" in done.stdout
    assert (f"Server 127.0.0.1:5432 ('default' {limit - 3}, 'result-backend' 4): the worker "
            f"may open {limit + 1} connections, above the server's max_connections ({limit})"
            in done.stderr)
    assert "hunter2" not in done.stdout + done.stderr


def test_a_worker_warns_when_its_pools_and_result_backend_together_exceed_the_server(
        worker_factory):
    with worker_factory(concurrency=2, conf=_tipping_conf(True)) as worker:
        worker.wait_for_log("asyncsql pool at start-up: Server 127.0.0.1:5432 (")
        assert "hunter2" not in worker.logs()
