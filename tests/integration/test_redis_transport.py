"""The Redis broker transport (``celery_asyncpool.broker``), each promise next to kombu's own.

Every test runs a real worker on a Redis server of its own (``redis_server``):
``visibility_timeout`` sweeps cover a whole database, and command counts cover
a whole server.
"""

from __future__ import annotations

import json

import pytest
import redis

from . import tasks_transport as tt
from .conftest import eventually, redis_server

INCLUDE = "tests.integration.tasks_transport"
OURS = "celery_asyncpool.broker:Transport"
TRANSPORTS = [pytest.param(None, id="kombu"), pytest.param(OURS, id="ours")]
POOLS = ["asyncsql", "prefork"]


def conf(transport: str | None, **options) -> dict:
    settings: dict = {"broker_transport_options": options} if options else {}
    if transport:
        settings["broker_transport"] = transport
    return settings


def unacked_tags(url: str) -> set[str]:
    return {tag.decode() for tag in redis.Redis.from_url(url).hkeys("unacked")}


def unacked_task_ids(url: str) -> set[str]:
    """The task ids of the deliveries in kombu's unacked hash (kombu's own format)."""
    stored = redis.Redis.from_url(url).hvals("unacked")
    return {json.loads(value)[0]["headers"]["id"] for value in stored}


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tasks_run_and_nothing_stays_unacked(worker_factory, transport, pool):
    task = tt.async_echo if pool == "asyncsql" else tt.sync_echo
    with redis_server() as url, worker_factory(pool=pool, concurrency=4, include=INCLUDE,
                                               conf=conf(transport), broker=url) as worker:
        results = [worker.send(task, i) for i in range(200)]
        assert [r.get(timeout=60) for r in results] == list(range(200))
        eventually(lambda: not unacked_tags(url), 10, "every delivery acked")
        assert worker.inspect().ping() == {worker.hostname: {"ok": "pong"}}, "broadcast works"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_worker_killed_between_taking_a_message_and_delivering_it(worker_factory, transport):
    """Stock kombu pops with BRPOP and records the delivery in a second round trip: a crash
    between them loses the message. Ours takes and records it in one script call, so the
    message waits in the unacked hash and another worker runs it after visibility_timeout."""
    options = {"visibility_timeout": 2, "unacked_restore_interval": 1,
               "unacked_restore_throttle": 1}
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        with worker_factory(pool="prefork", concurrency=1, include=INCLUDE, broker=url,
                            conf=conf(transport, **options), ready=False,
                            env={"ITEST_KILL_ON_DELIVER": "1"}) as doomed:
            queue = doomed.queue
            result = doomed.send(tt.sync_echo, "kept")
            doomed.proc.wait(60)  # it killed itself on the delivery
            doomed.kill()
        assert client.llen(queue) == 0, "the message left the queue"
        if transport is None:
            assert unacked_tags(url) == set(), "stock kombu: nowhere, lost"
        else:
            assert unacked_task_ids(url) == {result.id}, "ours: recorded as it was taken"
        with worker_factory(pool="prefork", concurrency=1, include=INCLUDE, broker=url,
                            conf=conf(transport, **options), queue=queue) as survivor:
            if transport is None:
                with pytest.raises(Exception):
                    result.get(timeout=8)
                assert "kept" not in survivor.logs()
            else:
                assert result.get(timeout=30) == "kept"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_malformed_message(worker_factory, transport):
    """Stock kombu pops a body that is not JSON, loses it, and the worker stops on the
    decode error ("Unrecoverable error"); ours moves it to a dead-letter list, says so
    naming the queue and the list, and delivers the messages around it."""
    with redis_server() as url, worker_factory(pool="asyncsql", concurrency=4, include=INCLUDE,
                                               conf=conf(transport), broker=url) as worker:
        client = redis.Redis.from_url(url)
        client.lpush(worker.queue, b"{not json")
        results = [worker.send(tt.async_echo, i) for i in range(5)]
        dead = f"_asyncsql.dead_letter.{worker.queue}"
        if transport is None:
            worker.wait_for_log("Unrecoverable error: JSONDecodeError")
            worker.proc.wait(60)
            assert b"{not json" not in client.lrange(worker.queue, 0, -1), "popped"
            assert client.llen(dead) == 0 and not unacked_task_ids(url) - {
                r.id for r in results}, "stock: lost"
        else:
            assert [r.get(timeout=30) for r in results] == list(range(5))
            assert client.lrange(dead, 0, -1) == [b"{not json"]
            worker.wait_for_log(f"A message in queue {worker.queue!r} is not a kombu message")
            assert repr(dead) in worker.logs()


# --- kombu-level: the same consumer code on both transports -------------------------------

def _connection(url: str, transport: str | None, **options):
    import kombu

    return kombu.Connection(url, transport=transport or "redis", transport_options=options)


def _consume(connection, queues, count: int, prefetch: int, ack: bool = True) -> list:
    """Drain ``count`` messages from ``queues``; return (queue, body, message) in order."""
    got: list = []

    def on_message(body, message):
        got.append((message.delivery_info["routing_key"], body, message))
        if ack:
            message.ack()

    with connection.Consumer(queues, callbacks=[on_message], prefetch_count=prefetch):
        eventually(lambda: _drain(connection) or len(got) >= count, 20, f"{count} messages")
    return got


def _drain(connection) -> bool:
    import socket

    try:
        connection.drain_events(timeout=0.2)
    except socket.timeout:
        pass
    return False


def _publish(connection, queue, bodies, **options) -> None:
    with connection.Producer() as producer:
        for body in bodies:
            producer.publish(body, routing_key=queue.routing_key, declare=[queue], **options)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_order_priority_steps_first_then_queues_in_turn(transport):
    """The same delivery order as kombu's: priority steps first, then the queues round-robin,
    interleaved within a batch."""
    import kombu

    with redis_server() as url, _connection(url, transport) as connection:
        a, b = (kombu.Queue(name, routing_key=name, max_priority=9) for name in ("a", "b"))
        _publish(connection, a, [f"a{i}" for i in range(4)], priority=0)
        _publish(connection, b, [f"b{i}" for i in range(4)], priority=0)
        _publish(connection, b, ["b-urgent"], priority=9)  # kombu's Redis: 9 is lowest
        _publish(connection, a, ["a-first"], priority=0)
        got = [body for _, body, _ in _consume(connection, [a, b], 10, prefetch=10)]
    assert got == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a-first", "b-urgent"]


def test_a_batch_never_exceeds_the_free_prefetch_window():
    import kombu

    with redis_server() as url, _connection(url, OURS) as connection:
        client = redis.Redis.from_url(url)
        queue = kombu.Queue("w", routing_key="w")
        _publish(connection, queue, list(range(20)))
        got = _consume(connection, [queue], 5, prefetch=5, ack=False)
        assert len(got) == 5 and client.hlen("unacked") == 5 and client.llen("w") == 15
        got[0][2].ack()
        got += _consume(connection, [queue], 1, prefetch=5, ack=False)
        assert client.llen("w") == 14, "one slot freed, one more taken"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_late_ack_after_a_redelivery_keeps_the_new_copy_recorded(transport):
    """A worker cut off past visibility_timeout acks late: its message was restored and
    fetched by another worker under the same delivery tag. Stock kombu's ack deletes the
    other worker's record (a crash of that worker then loses the message); ours leaves it."""
    import kombu

    options = {"visibility_timeout": 1}
    with redis_server() as url, _connection(url, transport, **options) as first, \
            _connection(url, transport, **options) as second:
        client = redis.Redis.from_url(url)
        queue = kombu.Queue("late", routing_key="late")
        _publish(first, queue, ["once"])
        [(_, _, stale)] = _consume(first, [queue], 1, prefetch=1, ack=False)
        eventually(lambda: first.default_channel.qos.restore_visible(num=10, interval=1) or
                   client.llen("late") == 1, 10, "restored after visibility_timeout")
        [(_, _, fresh)] = _consume(second, [queue], 1, prefetch=1, ack=False)
        assert fresh.delivery_tag == stale.delivery_tag
        stale.ack()
        first.default_channel.qos.flush_acks() if transport else None
        recorded = client.hexists("unacked", fresh.delivery_tag)
        assert recorded is (transport is not None), "stock loses the record, ours keeps it"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_round_trips_per_task(worker_factory, transport):
    """1,000 waiting tasks at -c 100: stock kombu spends a BRPOP and two MULTI/EXEC
    pipelines (record, ack) on each; ours a fraction of one script call."""
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        before = _calls(client)
        with worker_factory(pool="asyncsql", concurrency=100, include=INCLUDE, broker=url,
                            conf=conf(transport), ready=False) as worker:
            results = [worker.send(tt.async_echo, i) for i in range(1000)]
            assert [r.get(timeout=120) for r in results] == list(range(1000))
            eventually(lambda: not unacked_tags(url), 10, "every delivery acked")
            spent = {name: calls - before.get(name, 0) for name, calls in _calls(client).items()}
    per_task = {name: calls / 1000 for name, calls in spent.items()}
    if transport is None:
        assert per_task["brpop"] >= 1 and per_task["exec"] >= 2, per_task
    else:
        assert per_task.get("exec", 0) <= 0.01, per_task  # declarations at start-up
        assert per_task["evalsha"] + per_task.get("brpop", 0) <= 0.2, per_task


def _calls(client) -> dict[str, int]:
    return {name.removeprefix("cmdstat_"): stats["calls"]
            for name, stats in client.info("commandstats").items()}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_key_carries_the_global_keyprefix(transport):
    """The same keys as kombu's, all under ``global_keyprefix``: queues, unacked hash, index."""
    import kombu

    with redis_server() as url, _connection(url, transport,
                                            global_keyprefix="pfx:") as connection:
        client = redis.Redis.from_url(url)
        queue = kombu.Queue("p", routing_key="p")
        _publish(connection, queue, list(range(5)))
        got = _consume(connection, [queue], 3, prefetch=3, ack=False)
        assert len(got) == 3
        keys = {key.decode() for key in client.keys("*")}
        assert keys == {"pfx:p", "pfx:unacked", "pfx:unacked_index"}
        assert client.hlen("pfx:unacked") == 3 and client.llen("pfx:p") == 2


def test_with_worker_disable_prefetch_a_batch_is_one_message():
    """Celery's worker_disable_prefetch replaces the QoS instance's can_consume: one at a time."""
    import kombu

    with redis_server() as url, _connection(url, OURS) as connection:
        channel = connection.default_channel
        channel.qos.can_consume = lambda: True  # as Celery patches it: on the instance
        assert channel.batch_size() == 1
        queue = kombu.Queue("d", routing_key="d")
        _publish(connection, queue, list(range(5)))
        got = _consume(connection, [queue], 1, prefetch=10, ack=False)
        assert len(got) >= 1 and redis.Redis.from_url(url).hlen("unacked") == len(got)


def test_the_visibility_budget_holds_back_only_the_task_consumer():
    """With tasks waiting for a slot in this process, the budget holds back the consumer
    that set a prefetch window (the worker's) and no other: a client's reply consumer in
    the worker's own process (``inspect`` from a thread, Celery's in-process test worker)
    still gets its replies."""
    import kombu
    from celery.worker import state

    class Waiting:  # a request Celery reserved that no pool slot has taken yet
        def __init__(self, number: int) -> None:
            self.id = f"waiting-{number}"

    waiting = [Waiting(number) for number in range(3)]
    with redis_server() as url, _connection(url, OURS, visibility_budget=True) as connection:
        tasks, replies = (kombu.Queue(name, routing_key=name) for name in ("tasks", "replies"))
        _publish(connection, tasks, list(range(5)))
        _publish(connection, replies, ["pong"])
        assert _consume(connection, [replies], 1, prefetch=None)[0][1] == "pong"
        for request in waiting:
            state.task_reserved(request)
        try:
            _publish(connection, replies, ["pong again"])
            assert _consume(connection, [replies], 1, prefetch=None)[0][1] == "pong again"
            taken: list = []
            with connection.Consumer([tasks], prefetch_count=10,
                                     callbacks=[lambda body, message: taken.append(body)]):
                for _ in range(5):
                    _drain(connection)
                assert taken == [], "three wait, and the pace is not known: the ramp is one"
                for request in waiting:
                    state.task_ready(request)
                eventually(lambda: _drain(connection) or taken, 10, "a fetch once none wait")
        finally:
            for request in waiting:
                state.task_ready(request)
