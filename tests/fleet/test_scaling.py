"""Scaling a fleet out and in mid-run: a fourth host joins and takes a share of the queue;
one host shut down warm (SIGTERM) finishes what it runs, hands back what it holds, and
frees its connections while the others go on. ``inspect stats`` across the fleet lists
each worker's slots, tasks in flight and connections, matching ``pg_stat_activity``.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import psycopg

from celery_asyncpool.wire import STATS_INTERVAL_S

from tests.integration.conftest import eventually

from .fleet import Peak, fleet, ledger, mixed_batch, prepare_database, ran_on
from .postgres import postgres_server

SLOTS = 20
LATE = {"task_acks_late": True, "task_reject_on_worker_lost": True}
NAMED = {"asyncsql_engine_options": {}}  # connections named after their worker
METRICS_PORT = 9808  # each host's own: the hosts are network namespaces


def test_a_host_joins_and_one_shuts_down_warm_mid_run_losing_nothing(tmp_path):
    run = uuid.uuid4().hex
    with fleet(tmp_path, hosts=4) as hosts, \
            postgres_server(hosts.shared, max_connections=100) as url, \
            contextlib.ExitStack() as workers:
        dsn = url.replace("+asyncpg", "").replace(hosts.shared, "127.0.0.1")
        prepare_database(dsn)
        *first_three, fourth = hosts.hosts
        conf = {**LATE, **NAMED, "asyncsql_metrics_port": METRICS_PORT}
        started = [workers.enter_context(hosts.worker(host, concurrency=SLOTS, database_url=url,
                                                      conf=conf)) for host in first_three]
        leaving = started[0]
        with Peak(dsn, "postgres") as peak:
            ids = hosts.publish(mixed_batch(run, 1600, hold_s=1.0))
            eventually(lambda: sum(ledger(run, dsn).values()) >= 100, 60, "100 effects")
            joined = workers.enter_context(hosts.worker(fourth, concurrency=SLOTS,
                                                        database_url=url, conf=conf))
            eventually(lambda: ran_on(run, dsn)[fourth.name] > 0, 60, "the new host's first")
            stats = _fleet_stats(joined)
            assert leaving.stop() == 0, leaving.logs()[-3000:]  # SIGTERM: warm shutdown
            done_at_exit = sum(ledger(run, dsn).values())
            held_after_exit = _backends(dsn).get(leaving.hostname, 0)
            account = hosts.settle("a 4th host joins, one shuts down warm (SIGTERM)", ids, run,
                                   slots=4 * SLOTS, peak=peak, dsn=dsn)
        time.sleep(2 * STATS_INTERVAL_S)  # the children's reports, made at rest
        at_rest = _fleet_stats(joined)
        backends = _backends(dsn)
        scraped = {host.name: _scraped_connections(host) for host in hosts.hosts[1:]}
    assert account.missing == [] and account.failed_total == 0, account.reasons
    assert done_at_exit < len(ids), "the others had work left when the host left"
    assert held_after_exit == 0, "a host shut down warm closes its connections"
    assert {w.hostname for w in (*started, joined)} == set(stats), stats.keys()
    for node, asyncsql in stats.items():
        assert asyncsql["slots-per-process"] * asyncsql["processes"] == SLOTS, (node, asyncsql)
        assert 0 <= asyncsql["in-flight"] <= SLOTS
    for node, asyncsql in at_rest.items():  # idle: every open connection is checked in
        assert sum(asyncsql["connections"].values()) == backends.get(node, 0), \
            (node, asyncsql, backends)
    assert peak.value <= 3 * SLOTS + SLOTS
    assert scraped == {node.split("@")[0]: n for node, n in backends.items()
                       if node != leaving.hostname}, (scraped, backends)


def _fleet_stats(worker) -> dict[str, dict]:
    """Each worker's ``asyncsql`` entry of ``inspect stats``, asked on the fleet's broker."""
    replies = worker.control().inspect(timeout=2).stats() or {}
    return {node: reply["pool"]["asyncsql"] for node, reply in replies.items()}


def _backends(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return dict(conn.execute(
            "SELECT split_part(application_name, ' ', 1), count(*) FROM pg_stat_activity "
            "WHERE application_name LIKE '% asyncsql %' GROUP BY 1").fetchall())


def _scraped_connections(host) -> int:
    """``asyncsql_connections_open`` of the worker on ``host``, scraped from this machine."""
    from tests.integration.test_metrics import scrape, total

    return int(total(scrape(METRICS_PORT, host.links["net"].host_address),
                     "asyncsql_connections_open"))
