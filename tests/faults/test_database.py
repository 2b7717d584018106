"""The database goes away, mid-run or before the worker starts: tasks retry, nothing hangs.

The worker reaches PostgreSQL through a TCP proxy the test owns (``proxy.py``);
``down()`` refuses new connections and cuts the open ones. Tasks retry on
``celery_asyncpool.retry.DATABASE_ERRORS``; the engine has ``pool_pre_ping`` on, as the README
recommends, so once the server is back no task fails on a stale connection.
"""

from __future__ import annotations

import re
import time
import uuid

import pytest

from tests.integration import tasks
from tests.integration.conftest import eventually, pg_connections, pg_scalar

from .accounting import figure, publish, settle, stored, wait_settled
from .proxy import TcpProxy
from .sampling import Peak
from .tasks import INCLUDE
from .tasks_db import db_effect, db_effect_no_retry

pytestmark = pytest.mark.serial  # it cuts PostgreSQL connections and takes a proxy down

OUTAGE_S = 3.0
SETTLE_S = 60.0  # every task has a stored outcome by then: none waits on the lost database


def _through(proxy: TcpProxy, worker_factory, *, url: str | None = None, **kwargs):
    """A worker whose database is ``proxy``, with pre-ping on and its own application_name."""
    queue = f"itest-{uuid.uuid4().hex[:10]}"
    options = {"pool_pre_ping": True,
               "connect_args": {"server_settings": {"application_name": queue}}}
    return worker_factory(queue=queue, include=f"{INCLUDE},tests.faults.tasks_db,"
                          "tests.integration.tasks",
                          conf={"asyncsql_engine_options": options},
                          env={"ITEST_DATABASE_URL": url or proxy.url}, **kwargs)


def _cut_off(proxy: TcpProxy, app_name: str) -> None:
    """Take the database away: end the worker's backends, then refuse and cut connections."""
    pg_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
              "WHERE application_name = %s", app_name)
    proxy.down()


def _retries(ids: list[str]) -> list[int]:
    return [meta["retries"] for meta in stored(ids).values()]


def _retried_on(logs: str) -> set[str]:
    """The kinds of error the worker's tasks were retried on, from Celery's retry log lines."""
    return set(re.findall(r" retry: Retry in \d+s: (\w+)\(", logs))


def _budget(worker) -> int:
    stats = worker.inspect(timeout=5).stats()[worker.hostname]
    return int(stats["pool"]["asyncsql"]["connection-budget"]["default"])


def _holding_a_connection(app_name: str, at_least: int) -> int:
    """How many of the worker's tasks are in a statement, once at least ``at_least`` are."""
    count = int(pg_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                          "AND query LIKE 'SELECT pg_sleep%%'", app_name))
    return count if count >= at_least else 0


def test_tasks_cut_off_from_their_database_retry_and_succeed_once_it_is_back(worker_factory):
    run = uuid.uuid4().hex
    with TcpProxy() as proxy, _through(proxy, worker_factory, concurrency=8) as worker:
        budget = _budget(worker)
        with Peak(worker.app_name) as peak:
            ids = publish(worker, db_effect, 40, run, 1.0)
            cut = eventually(lambda: _holding_a_connection(worker.app_name, 4),
                             what="tasks holding a connection")
            _cut_off(proxy, worker.app_name)
            time.sleep(OUTAGE_S)
            proxy.up()
            wait_settled(ids, SETTLE_S)
            _cut_off(proxy, worker.app_name)  # again, now that the pools hold idle connections
            proxy.up()
            later = publish(worker, db_effect, 20, run)
            account = settle("database cut mid-run (pg_terminate_backend + proxy down 3 s), "
                             "then its idle connections",
                             ids + later, run=run, timeout_s=SETTLE_S)
        back = pg_connections(worker.app_name)
        retried_on = _retried_on(worker.logs())
    assert account.missing == []
    assert account.failed_total == 0, account.reasons
    assert account.once + account.again == 60
    retried = sum(1 for n in _retries(ids) if n > 0)
    assert retried >= cut, f"{retried} tasks retried, {cut} were in flight at the cut"
    assert _retries(later) == [0] * 20, "pre-ping: none fails on a stale pooled connection"
    assert 0 < back <= budget and peak.peaks[worker.app_name] <= budget, (back, peak.peaks)
    assert {"DBAPIError", "ConnectionRefusedError"} <= retried_on, "lost mid-statement; refused"
    figure("database cut: tasks retried / in flight at the cut", f"{retried} / {cut}")
    figure("database cut: errors retried on", ", ".join(sorted(retried_on)))
    figure("database cut: peak connections / budget", f"{peak.peaks[worker.app_name]} / {budget}")


def test_a_worker_starts_and_says_so_when_its_database_is_unreachable_then_recovers(
        worker_factory):
    """With the database away at start the worker runs on, naming it (password masked);
    its tasks fail with the driver's error or retry, and succeed once the database is up."""
    run = uuid.uuid4().hex
    with TcpProxy() as proxy:
        proxy.down()
        url = proxy.url.replace("postgres@", "postgres:hunter2@")  # trust: the password is unused
        with _through(proxy, worker_factory, concurrency=4, url=url) as worker:
            worker.wait_for_log(
                "asyncsql pool at start-up: Database 'default' (postgresql+asyncpg://postgres:"
                f"***@127.0.0.1:{proxy.port}/test) cannot be reached: ConnectionRefusedError")
            children = worker.children()
            assert worker.send(tasks.async_add, 1, 2).get(timeout=30) == 3, "tasks without it run"
            failing = publish(worker, db_effect_no_retry, 5, run)
            retrying = publish(worker, db_effect, 10, run)
            wait_settled(failing, SETTLE_S)
            time.sleep(OUTAGE_S)
            proxy.up()
            later = publish(worker, db_effect, 10, run)
            account = settle("database unreachable at start, up after 3 s",
                             failing + retrying + later, run=run, timeout_s=SETTLE_S)
            assert worker.children() == children, "no child restarted"
            logs = worker.logs()
    assert account.missing == []
    assert (account.once, account.again, dict(account.failed)) == \
        (20, 0, {"ConnectionRefusedError": 5})
    assert f"Connect call failed ('127.0.0.1', {proxy.port})" in \
        account.reasons["ConnectionRefusedError"]
    assert min(_retries(retrying)) >= 1 and _retries(later) == [0] * 10
    assert logs.count("cannot be reached") == 1
    assert "hunter2" not in logs
