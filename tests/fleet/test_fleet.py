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

from .fleet import SERVER_POOL, Peak, balances_and_increments, fleet, mixed_batch, ran_on

OURS = "celery_asyncpool.broker:Transport"
TRANSPORTS = {"kombu": None, "ours": OURS}
# Short, so that a cut host's messages come back to the others within the test.
VISIBILITY = {"visibility_timeout": 5, "unacked_restore_interval": 1,
              "unacked_restore_throttle": 1}
LATE = {"task_acks_late": True, "task_reject_on_worker_lost": True}


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
                                             ("ours", "early")])
def test_a_host_cut_off_mid_run_loses_nothing_and_takes_work_again_when_back(
        tmp_path, transport, acks):
    """One host's link goes down for 12 s (past the 5 s visibility timeout) while it runs
    tasks: the others finish what it held; it comes back by itself and takes work again."""
    run, after = uuid.uuid4().hex, uuid.uuid4().hex
    conf = {"broker_transport_options": VISIBILITY, **(LATE if acks == "late" else {})}
    with fleet(tmp_path, hosts=3) as hosts, contextlib.ExitStack() as workers:
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
            account = hosts.settle(f"a host cut off for 12 s ({transport} transport, "
                                   f"{acks} acks)", ids, run, slots=60, peak=peak)
            second = hosts.publish(mixed_batch(after, 300, hold_s=0.5))
            eventually(lambda: sum(ran_on(after).values()) >= 300, 120, "the second batch")
        spread = ran_on(after)
    assert account.missing == [] and account.failed_total == 0, account.reasons
    assert held_by_others > 0
    assert spread[cut.name] > 0, \
        f"the host back from the cut took no work: {spread}\n{started[0].logs()[-4000:]}"
    assert sum(spread.values()) == len(second)
    assert 0 < peak.value <= SERVER_POOL, f"PostgreSQL saw {peak.value} backends"
