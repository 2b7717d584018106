"""Behind PgBouncer in transaction mode: asyncsql_pgbouncer makes each engine safe there,
and ``celery asyncsql check`` and the worker find a pooler the settings do not expect."""

from __future__ import annotations

import psycopg

from . import tasks as t
from .pgbouncer import pgbouncer
from .test_check_and_config import celery

TASKS = 300


def _through(port: int) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test"


def test_check_finds_an_idle_pooler_and_names_the_setting():
    with pgbouncer() as port:
        missing = celery("asyncsql", "check", "-c", "4",
                         conf={"asyncsql_database_url": _through(port)})
        set_up = celery("asyncsql", "check", "-c", "4",
                        conf={"asyncsql_database_url": _through(port), "asyncsql_pgbouncer": True})
    assert missing.returncode != 0
    assert "connection pooler" in missing.stdout + missing.stderr
    assert "asyncsql_pgbouncer = True" in missing.stdout + missing.stderr
    assert set_up.returncode == 0, set_up.stdout + set_up.stderr
    assert "through a pooler (engines set up for it)" in set_up.stdout


def test_check_judges_the_fleets_client_connections_by_pgbouncers_max_client_conn():
    """Behind PgBouncer the server's max_connections bounds nothing the workers open:
    PgBouncer's max_client_conn does (read on its admin console)."""
    with pgbouncer(max_client_conn=10) as port:
        done = celery("asyncsql", "check", "-c", "20",
                      conf={"asyncsql_database_url": _through(port), "asyncsql_pgbouncer": True,
                            "asyncsql_processes": 1})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "through PgBouncer: max_client_conn = 10" in done.stdout
    assert (f"Server 127.0.0.1:{port}: the fleet may open 20 connections (this check's worker "
            "20), above the 10 client connections PgBouncer takes (max_client_conn 10)"
            in done.stderr), done.stderr


def test_the_same_statement_in_every_task_fails_without_the_setting_and_never_with_it(
        worker_factory):
    """-c 20 through 2 server connections, 300 tasks each running one parameterised SELECT
    three times. Without the setting asyncpg's named statements meet the wrong server
    connection; with it none fail, and none are left prepared on the server."""
    outcomes = {}
    for pooled in (False, True):
        with pgbouncer(pool_size=2) as port:
            conf = {"asyncsql_database_url": _through(port), "asyncsql_pgbouncer": pooled,
                    "asyncsql_processes": 2}
            with worker_factory(concurrency=20, conf=conf) as worker:
                results = [worker.send(t.same_select_three_times, n) for n in range(TASKS)]
                failed = 0
                for n, result in enumerate(results):
                    try:
                        assert result.get(timeout=60) == [n + 1] * 3
                    except Exception:  # the task's own error, re-raised by get()
                        failed += 1
                logs = worker.logs()
            # Each sample lands on one of the two server connections.
            left = max(_prepared_through(port) for _ in range(6))
        outcomes[pooled] = (failed, left, logs)
    (failed_without, left_without, logs_without), (failed, left, logs) = outcomes.values()
    assert "connection pooler" in logs_without, "the worker warns at start-up"
    # The control: named statements break (150 to 193 of 300 in three runs). What they
    # leave prepared on the server connections is not asserted (5 to 20 in those runs; the
    # control asserting both failed twice on 2026-12-07): it is printed on failure.
    assert failed_without > 0, ("the control: named statements break", left_without)
    assert failed == 0, logs[-3000:]
    assert left == 0, "no statement left prepared on the pooler's server connections"
    assert "connection pooler" not in logs


def _prepared_through(port: int) -> int:
    """Statements prepared on the server connection this transaction got (one of two)."""
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/test", autocommit=True,
                         prepare_threshold=None) as connection:
        return int(connection.execute("SELECT count(*) FROM pg_prepared_statements")
                   .fetchone()[0])
