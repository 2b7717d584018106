"""The examples run as written: the embedded quickstart, and both on PostgreSQL and Redis."""

import os
import subprocess
import sys
import uuid

from .conftest import ROOT, pg_scalar


def run_example(script, tmp_path, env, *args):
    environment = {**os.environ, **env}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                          capture_output=True, text=True, env=environment, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_quickstart_needs_no_server(tmp_path):
    out = run_example("quickstart/main.py", tmp_path, {"QUICKSTART_VAR": str(tmp_path)},
                      "--tasks", "6")
    assert "6 tasks done by a -P asyncsql worker" in out
    assert "'visits': 2" in out and "broker: filesystem://" in out


def test_quickstart_on_postgresql_and_redis(tmp_path):
    pg_scalar("DROP TABLE IF EXISTS visits")
    out = run_example("quickstart/main.py", tmp_path, {
        "QUICKSTART_VAR": str(tmp_path),
        "QUICKSTART_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        "QUICKSTART_BROKER": "redis://127.0.0.1:6379/13",
        "QUICKSTART_BACKEND": "redis://127.0.0.1:6379/13",
    }, "--tasks", "4")
    assert "4 tasks done" in out
    assert pg_scalar("SELECT count(*) FROM visits") == 4


def test_orm_example_updates_commits_and_retries_after_rollback(tmp_path):
    out = run_example("orm/main.py", tmp_path, {
        "ORM_VAR": str(tmp_path),
        "ORM_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        "ORM_BROKER": "redis://127.0.0.1:6379/13",
        "ORM_BACKEND": "redis://127.0.0.1:6379/13",
    }, "--users", "3")
    assert "{'user': 'user-1', 'status': 'active', 'logins': 1, 'attempts': 2}" in out
    assert pg_scalar("SELECT sum(logins) FROM orm_profiles") == 3
    assert pg_scalar("SELECT count(*) FROM orm_users WHERE status = 'active'") == 3


def run_example_tests(folder, prefix, tmp_path, redis_db):
    """``pytest examples/<folder>`` in a subprocess, on PostgreSQL and Redis."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", f"examples/{folder}"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env={
            **os.environ, f"{prefix}_VAR": str(tmp_path),
            f"{prefix}_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
            f"{prefix}_BROKER": f"redis://127.0.0.1:6379/{redis_db}",
            f"{prefix}_BACKEND": f"redis://127.0.0.1:6379/{redis_db}",
            f"{prefix}_QUEUE": f"{folder}-{uuid.uuid4().hex[:8]}"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_testing_example_runs_with_the_pytest_plugin(tmp_path):
    pg_scalar("DROP TABLE IF EXISTS testing_notes")
    assert "2 passed" in run_example_tests("testing", "TESTING", tmp_path, 7)
    assert pg_scalar("SELECT count(*) FROM testing_notes WHERE text LIKE 'worker-%%'") == 3


def test_fastapi_example_shares_session_with_the_tasks(tmp_path):
    pg_scalar("DROP TABLE IF EXISTS fastapi_documents")
    assert "4 passed" in run_example_tests("fastapi", "FASTAPI", tmp_path, 8)
    # 1 + 2 + 3, then 1 (the rolled-back request's document is not there), then 3
    assert pg_scalar("SELECT sum(words) FROM fastapi_documents WHERE status = 'counted'") == 10
    server_log = (tmp_path / "uvicorn.log").read_text()
    assert "Application shutdown complete" in server_log
    assert "not disposed" not in server_log, "the lifespan disposes the server's engines"


SERVERS = {"DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
           "BROKER": "redis://127.0.0.1:6379/6", "BACKEND": "redis://127.0.0.1:6379/6"}


def on_servers(prefix, tmp_path):
    """An example's environment for PostgreSQL and Redis, under its own prefix."""
    return {f"{prefix}_VAR": str(tmp_path),
            **{f"{prefix}_{name}": value for name, value in SERVERS.items()}}


def test_mixed_example_chains_a_sync_task_into_an_async_one(tmp_path):
    out = run_example("mixed/main.py", tmp_path, on_servers("MIXED", tmp_path), "--files", "4")
    assert out.count("'thread': 'MainThread'") == 4, "the async tasks ran on the children's loops"
    assert "counted by a sync task: {'rows': 4, 'thread': 'asyncsql-sync" in out
    assert pg_scalar("SELECT count(DISTINCT sha256) FROM mixed_checksums") == 4


def test_periodic_example_runs_an_async_task_from_celery_beat(tmp_path):
    out = run_example("periodic/main.py", tmp_path, on_servers("PERIODIC", tmp_path),
                      "--seconds", "5")
    rows = pg_scalar("SELECT count(DISTINCT task_id) FROM periodic_heartbeats")
    assert rows >= 3, out
    assert f"{rows} heartbeats written in 5 s" in out
    assert pg_scalar("SELECT max(ran_at) - min(ran_at) >= interval '2 seconds' "
                     "FROM periodic_heartbeats"), "runs spread over time, one per beat tick"
