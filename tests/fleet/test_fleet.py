"""A fleet of ``-P asyncsql`` workers, one per host, on one Redis, one PgBouncer in
transaction mode (``default_pool_size = 20``) and the machine's PostgreSQL
(``max_connections = 100``): every task accounted for, per scenario.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import pytest

from tests.integration.conftest import eventually

from .fleet import NOTES, SERVER_POOL, Peak, balances_and_increments, fleet, ledger, \
    mixed_batch, ran_on

OURS = "celery_asyncpool.broker:Transport"
TRANSPORTS = {"kombu": None, "ours": OURS, "rabbitmq": None}
TAKES_WORK_AGAIN_S = 90  # after a 12 s cut: TCP's backed-off retransmits, Celery's reconnect
# Short, so that a cut host's messages come back to the others within the test.
VISIBILITY = {"visibility_timeout": 5, "unacked_restore_interval": 1,
              "unacked_restore_throttle": 1}
LATE = {"task_acks_late": True, "task_reject_on_worker_lost": True}
# RabbitMQ learns of a cut host from its missing heartbeats; without publisher confirms a
# publish written into a connection the broker has dropped (a retry, during the cut) is lost.
# A publish that fails for the whole retry policy makes Celery reject a retrying task
# (Task.retry): the policy outlasts the cut.
RABBITMQ = {"broker_heartbeat": 4, "broker_transport_options": {"confirm_publish": True},
            "task_publish_retry_policy": {"max_retries": 20, "interval_start": 0,
                                          "interval_step": 1, "interval_max": 2}}


@pytest.mark.timeout(300)
def test_three_hosts_at_c100_through_one_pgbouncer_lose_nothing_and_postgres_sees_its_pool(
        tmp_path):
    """300 slots on 20 server connections: the mixed batch completes once each, the
    accounts add up, each host takes a share, PostgreSQL never sees more than the pool."""
    run = uuid.uuid4().hex
    with fleet(tmp_path, hosts=3) as hosts, contextlib.ExitStack() as workers:
        for host in hosts.hosts:
            workers.enter_context(hosts.worker(host, concurrency=100, conf=LATE))
        with Peak() as peak:
            ids = hosts.publish(mixed_batch(run, 1200))
            account = hosts.settle("3 hosts at -c 100, one PgBouncer (pool 20), mixed batch",
                                   ids, run, slots=300, peak=peak)
        total, increments = balances_and_increments(run)
        spread = ran_on(run)
    assert account.missing == [] and account.failed_total == 0, account.reasons
    assert account.once == len(ids), f"{account.again} ran again with nothing cut"
    assert total == increments == 300, "each increment committed with its effect, once"
    assert len(spread) == 3 and min(spread.values()) > 0, f"each host takes a share: {spread}"
    assert 0 < peak.value <= SERVER_POOL, f"PostgreSQL saw {peak.value} backends"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport, acks", [("kombu", "late"), ("ours", "late"),
                                             ("ours", "early"), ("rabbitmq", "late"),
                                             ("rabbitmq", "early")])
def test_a_host_cut_off_mid_run_loses_nothing_and_takes_work_again_when_back(
        tmp_path, transport, acks):
    """One host's link goes down for 12 s (past the 5 s visibility timeout on Redis, and
    RabbitMQ's two missed 4 s heartbeats) while it runs tasks: the others finish what it
    held; it comes back by itself and takes work again."""
    run, after = uuid.uuid4().hex, uuid.uuid4().hex
    broker = "amqp" if transport == "rabbitmq" else "redis"
    conf = {**(RABBITMQ if broker == "amqp" else {"broker_transport_options": VISIBILITY}),
            **(LATE if acks == "late" else {})}
    with fleet(tmp_path, hosts=3, broker=broker) as hosts, contextlib.ExitStack() as workers:
        cut, *others = hosts.hosts
        started = [workers.enter_context(hosts.worker(host, concurrency=20, conf=conf,
                                                      transport=TRANSPORTS[transport]))
                   for host in hosts.hosts]
        with Peak() as peak:
            ids = hosts.publish(mixed_batch(run, 600, hold_s=1.0))
            eventually(lambda: ran_on(run)[cut.name] > 0, 60, "the host to be cut to commit tasks")
            cut.down("net")
            time.sleep(12)
            held_by_others = sum(ran_on(run)[host.name] for host in others)
            cut.up("net")
            back = time.monotonic()
            account = hosts.settle(f"a host cut off for 12 s ({transport} transport, "
                                   f"{acks} acks)", ids, run, slots=60, peak=peak)
            eventually(lambda: _consuming(started[0]), 60, "the cut host consuming again")
            # A steady stream until the cut host takes some: its broker connection carries
            # data again only when TCP retransmits what the cut held back, on a timer that
            # backed off during the cut (a fixed second batch of 15 s was done before that
            # in CI on 2026-12-07). How long that took is the scenario's note.
            second: list[str] = []
            while not ran_on(after)[cut.name]:
                assert time.monotonic() - back < TAKES_WORK_AGAIN_S, (
                    f"the host back from the cut took no work in {TAKES_WORK_AGAIN_S} s: "
                    f"{ran_on(after)}\n{started[0].logs()[-4000:]}")
                second += hosts.publish(mixed_batch(after, 40, hold_s=1.0))
                time.sleep(2)
            NOTES.append(f"a host cut off for 12 s ({transport} transport, {acks} acks) took "
                         f"work again {time.monotonic() - back:.0f} s after its link came back")
            eventually(lambda: set(ledger(after)) == set(second), 120, "the second batch")
        spread = ran_on(after)
    assert account.missing == [] and account.failed_total == 0, account.reasons
    assert held_by_others > 0
    # At least once: with a 5 s visibility timeout a task waiting its turn may be run twice.
    assert sum(spread.values()) >= len(second)
    # Once in about ten runs 21: PgBouncer closes the server connection of a transaction
    # the cut client left open and opens another, and the old backend is still listed.
    assert 0 < peak.value <= SERVER_POOL + 1, f"PostgreSQL saw {peak.value} backends"


def _consuming(worker) -> bool:
    """Whether the worker's consumer is connected: it never lost the broker, or it has
    connected again since it last did (Celery's reconnects back off to several seconds)."""
    logs = worker.logs()
    return logs.rfind("Connected to ") > logs.rfind("Connection to broker lost")
