"""`celery asyncsql check`, and bad settings failing a worker at start-up with a clear message."""

import json
import os
import subprocess
import sys

import pytest

from . import tasks
from .conftest import ROOT, pg_scalar


def celery(*args, conf=None, timeout=90):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ITEST_CONF": json.dumps(conf or {})}
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


@pytest.mark.parametrize("conf,message", [
    ({"asyncsql_proceses": 2}, "Did you mean 'asyncsql_processes'?"),
    ({"asyncsql_engine_options": {"pool_sise": 3}}, "rejected by create_async_engine"),
    ({"asyncsql_processes": 0}, "Setting asyncsql_processes has value 0; expected a whole "
                                "number >= 1, or None."),
    ({"asyncsql_database_url": "postgresql+psycopg2://u:pw@h/db"},
     "driver 'psycopg2' is not async"),
])
def test_a_worker_with_a_bad_setting_fails_at_start_up_naming_it(conf, message):
    done = celery("worker", "-P", "asyncsql", "-c", "2", "-Q", "itest-never-used", conf=conf)
    assert done.returncode != 0
    assert message in done.stdout + done.stderr
    assert "pw@" not in done.stdout + done.stderr


def test_a_worker_warns_at_start_up_when_its_budget_exceeds_max_connections(worker_factory):
    conf = {"asyncsql_engine_options": {"pool_size": 1000}}
    with worker_factory(concurrency=2, conf=conf) as worker:
        worker.wait_for_log("asyncsql pool at start-up: Database 'default': the worker may open "
                            "2000 connections, above the server's max_connections")
        assert worker.send(tasks.async_add, 1, 2).get(timeout=30) == 3


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
