"""The broker connection drops under a busy pool (DESIGN.md section 4, rows 16 and 21).

The worker's own broker connections are closed from outside, on the broker:
Redis ``CLIENT KILL`` or RabbitMQ ``close_connection``, matched by the local
ports of the worker's main process. The result backend (Redis DB 15) stays up.

The Redis broker here is DB 13 with a short ``visibility_timeout``: the
sweep that redelivers unacked messages covers every consumer of a database,
so a short timeout on DB 14 would redeliver other tests' long tasks.
"""

from __future__ import annotations

import subprocess

import psutil
import pytest
import redis

from . import tasks_broker as tb
from .conftest import RABBITMQ_URL, eventually, pg_scalar

# It closes the worker's broker connections, and its prefork reference counts redeliveries
# after a 6 s visibility timeout that a loaded machine can outlast.
pytestmark = pytest.mark.serial

INCLUDE = "tests.integration.tasks,tests.integration.tasks_broker"
REDIS_BROKER = "redis://127.0.0.1:6379/13"
BROKERS = [pytest.param(REDIS_BROKER, id="redis"), pytest.param(RABBITMQ_URL, id="amqp")]
VISIBILITY_S = 6
TRANSPORT = {"visibility_timeout": VISIBILITY_S, "unacked_restore_interval": 1,
             "unacked_restore_throttle": 1}


@pytest.fixture(autouse=True)
def events_table():
    pg_scalar(tb.TABLE)


def events(task_id: str, kind: str) -> int:
    return int(pg_scalar("SELECT count(*) FROM broker_events WHERE task_id = %s AND kind = %s",
                         task_id, kind))


def _broker_ports(worker, port: int) -> set[int]:
    """Local ports of the worker's main-process connections to ``port`` on the broker host."""
    return {c.laddr.port for c in psutil.Process(worker.pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


def drop_broker_connections(worker) -> int:
    """Close the worker's broker connections on the broker's side; return how many."""
    if worker.broker.startswith("redis"):
        db = worker.broker.rsplit("/", 1)[1]
        ports = _broker_ports(worker, 6379)
        client = redis.Redis.from_url(worker.broker)
        mine = [c for c in client.client_list()
                if int(c["addr"].rsplit(":", 1)[1]) in ports and c["db"] == db]
        for c in mine:
            client.client_kill_filter(_id=c["id"])
        return len(mine)
    ports = _broker_ports(worker, 5672)
    listing = subprocess.run(["rabbitmqctl", "-q", "list_connections", "peer_port", "pid"],
                             check=True, capture_output=True, text=True).stdout
    pids = [pid for port, _, pid in (line.partition("\t") for line in listing.splitlines())
            if port.isdigit() and int(port) in ports]
    for pid in pids:
        subprocess.run(["rabbitmqctl", "-q", "close_connection", pid, "test: connection lost"],
                       check=True, capture_output=True)
    return len(pids)


def _active(worker) -> int:
    active = worker.inspect().active() or {}
    return len(active.get(worker.hostname, []))


def _reserved(worker) -> int:
    reserved = worker.inspect().reserved() or {}
    return len(reserved.get(worker.hostname, []))


# --- row 21: running tasks finish, unstarted ones are redelivered -----------------------------

# Both layouts of the two slots (one child, or one slot in each of two) on Redis; on
# RabbitMQ, where the layout changes nothing the broker sees, one child.
@pytest.mark.parametrize("broker,processes", [
    pytest.param(REDIS_BROKER, 1, id="redis-2-slots"),
    pytest.param(REDIS_BROKER, 2, id="redis-1-slot"),
    pytest.param(RABBITMQ_URL, 1, id="amqp-2-slots")])
@pytest.mark.parametrize("cancel", [False, True], ids=["cancel-off", "cancel-on"])
def test_connection_loss_running_tasks_finish_and_unstarted_are_redelivered(
        worker_factory, broker, cancel, processes):
    early, late, waiting = _lose_the_connection_with_tasks_in_flight(
        worker_factory, broker, cancel, "asyncsql", tb.hold, tb.hold_late, processes)
    if cancel:
        assert events(late.id, "cancelled") == 1, "the running acks_late task, once"
        assert_redelivered_after_the_cancel(late)


@pytest.mark.load  # a control: CI's load part runs it, to keep scripts/test within 10 min
@pytest.mark.parametrize("cancel", [False, True], ids=["cancel-off", "cancel-on"])
def test_prefork_on_connection_loss_as_a_reference(worker_factory, cancel):
    """The same on stock prefork, with the sync twins: the asyncsql test asks no more."""
    early, late, waiting = _lose_the_connection_with_tasks_in_flight(
        worker_factory, REDIS_BROKER, cancel, "prefork", tb.sync_hold, tb.sync_hold_late)
    if cancel:  # its process killed: no row for the cancel itself
        assert_redelivered_after_the_cancel(late)


def assert_redelivered_after_the_cancel(late) -> None:
    """The cancelled acks_late run, then the redelivered one run to its end: at least once.

    kombu's Redis transport restores the unacked message when the channel closes, and its
    visibility timeout can restore it a second time (seen on prefork: 3 starts, 2 ends; the
    pool shares the transport), so every start but the cancelled one ends, however many.
    """
    starts, ends = events(late.id, "start"), events(late.id, "end")
    assert starts >= 2 and ends == starts - 1, (starts, ends)


def _lose_the_connection_with_tasks_in_flight(worker_factory, broker, cancel, pool,
                                              hold, hold_late, processes=1):
    """Two slots busy (one task acked at its start, one ``acks_late``; in one child or
    one each in two), three more reserved; drop the broker connection; check what
    every pool must do."""
    conf = {"asyncsql_processes": processes, "broker_transport_options": TRANSPORT,
            "worker_cancel_long_running_tasks_on_connection_loss": cancel}
    with worker_factory(pool=pool, concurrency=2, include=INCLUDE, conf=conf,
                        broker=broker) as worker:
        early = worker.send(hold, 3)
        late = worker.send(hold_late, 3)
        eventually(lambda: events(early.id, "start") and events(late.id, "start"), 15,
                   "both slots busy")
        waiting = [worker.send(hold, 0.2) for _ in range(3)]
        eventually(lambda: _reserved(worker) == 3, 10, "three reserved, not started")
        assert drop_broker_connections(worker) >= 1
        worker.wait_for_log("Connection to broker lost")
        assert early.get(timeout=60) and late.get(timeout=60)
        assert all(r.get(timeout=60) for r in waiting)
    assert (events(early.id, "start"), events(early.id, "end")) == (1, 1)
    assert events(early.id, "cancelled") == 0, "a task acked at its start is never cancelled"
    for r in waiting:
        assert (events(r.id, "start"), events(r.id, "cancelled")) == (1, 0), \
            "a task not started runs once, redelivered"
    if not cancel:
        assert events(late.id, "cancelled") == 0
        assert events(late.id, "end") >= 1, "the running task finished"
    return early, late, waiting


# --- row 16: prefetch is slots x multiplier, also after a reconnect ----------------------------

def _prefetch(worker) -> int | None:
    stats = worker.inspect(timeout=5).stats() or {}
    return stats.get(worker.hostname, {}).get("prefetch_count")


@pytest.mark.parametrize("broker", BROKERS)
def test_prefetch_is_restored_to_slots_times_multiplier_after_a_reconnect(worker_factory, broker):
    """Celery lowers prefetch by the tasks running at a reconnect (when QoS is global, as on
    RabbitMQ classic queues) and raises it again as new messages are acked."""
    conf = {"asyncsql_processes": 2, "worker_prefetch_multiplier": 3,
            "broker_transport_options": TRANSPORT}
    with worker_factory(concurrency=4, include=INCLUDE, conf=conf, broker=broker) as worker:
        assert _prefetch(worker) == 12
        running = [worker.send(tb.hold, 6) for _ in range(2)]
        eventually(lambda: all(events(r.id, "start") for r in running), 15, "two running")
        assert drop_broker_connections(worker) >= 1
        worker.wait_for_log("Connection to broker lost")
        if broker == RABBITMQ_URL:
            worker.wait_for_log("reducing the prefetch count to 6 ")  # 12 - 2 running x 3
            assert _prefetch(worker) == 6
        else:
            worker.wait_for_log("Skipping prefetch count reduction")  # per-consumer QoS
        assert all(r.get(timeout=30) for r in running)
        assert all(r.get(timeout=30) for r in [worker.send(tb.hold, 0) for _ in range(6)])
        eventually(lambda: _prefetch(worker) == 12, 20, "prefetch back at 4 slots x 3")
