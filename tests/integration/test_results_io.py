"""Celery's own I/O off the child's loop (DESIGN.md section 4 with slots): every state an async
task's tracer writes is one script call on a Redis backend, chords and links stay Celery's,
publishing can be awaited, and a SUCCESS once stored is never replaced.

Tests that count Redis commands run against a ``redis-server`` of their own, so other tests'
commands do not blur the figures.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis
from celery import Celery, chain, chord, group, states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError, OperationalError

from celery_asyncpool import results

from . import tasks_results as tr
from .app import app
from .conftest import REDIS_URL, eventually, redis_server

INCLUDE = "tests.integration.tasks,tests.integration.tasks_results"


def _client(backend_url: str) -> Celery:
    """An app reading (and writing) results on ``backend_url``, sending on the tests' broker."""
    client = Celery("results-client", broker=REDIS_URL, backend=backend_url)
    client.conf.result_extended = True
    return client


def _commands(url: str) -> dict[str, int]:
    stats = redis.Redis.from_url(url).info("commandstats")
    return {name.removeprefix("cmdstat_"): value["calls"] for name, value in stats.items()}


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after
            if after[name] != before.get(name, 0)}


@pytest.mark.parametrize("track_started", [False, True], ids=["plain", "track_started"])
def test_each_state_an_async_task_writes_is_one_script_call_and_no_read(worker_factory,
                                                                       track_started):
    with redis_server() as backend_url:
        conf = {"task_track_started": track_started, "asyncsql_processes": 1}
        with worker_factory(concurrency=8, include=INCLUDE, conf=conf,
                            env={"ITEST_BACKEND": backend_url}) as worker:
            client = _client(backend_url)
            worker.send(tr.add, 0, 0)  # the child's first store opens its connection
            store = redis.Redis.from_url(backend_url)
            eventually(lambda: store.dbsize() == 1, 30, "the warm-up result stored")
            before = _commands(backend_url)
            ids = [worker.send(tr.add, i, i).id for i in range(40)]
            writes = 2 if track_started else 1
            eventually(lambda: _delta(before, _commands(backend_url)).get("evalsha") == 40 * writes,
                       30, f"{40 * writes} state writes")
            time.sleep(0.5)  # anything else the stores would send
            spent = _delta(before, _commands(backend_url))
            for command in ("info", "hello", "client|setinfo"):
                spent.pop(command, None)  # the test's own, and a new connection's greeting
            # Each write: one SET NX GET; over a STARTED, one SET more.
            sets = 40 * (3 if track_started else 1)
            assert spent == {"evalsha": 40 * writes, "set": sets, "publish": 40 * writes}, spent
            metas = [client.backend.get_task_meta(task_id) for task_id in ids]
    assert [m["result"] for m in metas] == [2 * i for i in range(40)]
    assert {m["status"] for m in metas} == {states.SUCCESS}
    assert {m["name"] for m in metas} == {tr.add.name}  # result_extended, as Celery writes it
    assert metas[3]["args"] == [3, 3]


def test_chords_chains_groups_links_retries_and_failures_of_async_tasks(worker_factory):
    with worker_factory(concurrency=8, include=INCLUDE,
                        conf={"asyncsql_processes": 1}) as worker:
        queue = {"queue": worker.queue}
        body = tr.total.s().set(**queue)
        header = [tr.add.s(i, i).set(**queue) for i in range(10)]
        assert chord(header)(body).get(timeout=30) == 90
        assert chain(tr.add.s(1, 2).set(**queue), tr.add.s(3).set(**queue)).apply_async(
        ).get(timeout=30) == 6
        assert group(tr.add.s(i, 1).set(**queue) for i in range(5)).apply_async().get(
            timeout=30) == [1, 2, 3, 4, 5]
        linked = worker.send(tr.add, 2, 2, link=tr.echo.s().set(**queue))
        assert linked.get(timeout=30) == 4
        child = eventually(lambda: linked.children, 30, "the link's result")[0]
        assert child.get(timeout=30) == 4
        errback = worker.send(tr.fail, "boom", link_error=tr.echo.si("errback ran").set(**queue))
        with pytest.raises(ValueError, match="boom"):
            errback.get(timeout=30)
        assert app.backend.get_task_meta(errback.id)["args"] == ["boom"]
        failed_chord = chord([tr.add.s(1, 1).set(**queue), tr.fail.s("in a chord").set(**queue)])(
            tr.total.s().set(**queue))
        with pytest.raises(Exception, match="in a chord"):
            failed_chord.get(timeout=30)
        retried = worker.send(tr.retry_twice)
        assert retried.get(timeout=30) == 2
        with pytest.raises(KeyError, match="gave up"):
            worker.send(tr.retry_forever).get(timeout=30)


def test_chords_that_complete_at_once_in_one_child_each_call_their_body_once(worker_factory):
    """Their last parts join the chord on the offload threads at once: no lock held on the loop."""
    with worker_factory(concurrency=20, include=INCLUDE,
                        conf={"asyncsql_processes": 1}) as worker:
        queue = {"queue": worker.queue}
        chords = [chord([tr.add.s(n, i).set(**queue) for i in range(5)])(
            tr.total.s().set(**queue)) for n in range(20)]
        assert [c.get(timeout=60) for c in chords] == [5 * n + 10 for n in range(20)]


def test_tasks_await_their_publishes_and_their_children_know_their_parent(worker_factory):
    with worker_factory(concurrency=4, include=INCLUDE,
                        conf={"asyncsql_processes": 1}) as worker:
        parent = worker.send(tr.send_children, 5)
        child_ids = parent.get(timeout=30)
        children = [app.AsyncResult(i) for i in child_ids]
        assert [c.get(timeout=30) for c in children] == [0, 2, 4, 6, 8]
        assert {app.backend.get_task_meta(i)["parent_id"] for i in child_ids} == {parent.id}
        chained_id, grouped_id = worker.send(tr.send_canvas).get(timeout=30)
        assert app.AsyncResult(chained_id).get(timeout=30) == 10
        linked = worker.send(tr.send_children, 3, True)
        first = app.AsyncResult(linked.get(timeout=30)[2])
        assert first.get(timeout=30) == 4
        assert eventually(lambda: first.children, 30, "the link sent")[0].get(timeout=30) == 4


def test_many_tasks_publishing_at_once_through_one_producer_do_not_deadlock(worker_factory):
    """One producer for the whole child: the eleventh waiter would hang a loop that held one."""
    conf = {"broker_pool_limit": 1, "asyncsql_processes": 1}
    with worker_factory(concurrency=20, include=INCLUDE, conf=conf) as worker:
        parents = [worker.send(tr.send_children, 4, i % 2 == 0) for i in range(20)]
        child_ids = [i for p in parents for i in p.get(timeout=60)]
        assert len(child_ids) == 80
        assert sorted(app.AsyncResult(i).get(timeout=60) for i in child_ids) == sorted(
            [2 * i for i in range(4)] * 20)


def test_a_refused_broker_raises_in_the_awaiting_coroutine_while_the_loop_runs_on():
    refusing = Celery("refused", broker="redis://127.0.0.1:1/0", backend=None)

    @refusing.task(base=tr.AsyncTask)
    async def nothing():
        return None

    async def scenario():
        gaps, last = [], time.monotonic()

        async def tick():
            nonlocal last
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.create_task(tick())
        started = time.monotonic()
        with pytest.raises(OperationalError):
            await nothing.aapply_async(retry=True, retry_policy={
                "max_retries": 3, "interval_start": 0.2, "interval_step": 0.2})
        ticker.cancel()
        return time.monotonic() - started, max(gaps)

    spent, worst_gap = asyncio.run(scenario())
    assert spent >= 0.6  # Celery's retry policy ran: 0.2 + 0.4, then it gave up
    assert worst_gap < 0.2, f"the loop stalled {worst_gap:.3f}s while the publish failed"


def test_aapply_async_names_what_it_cannot_send():
    with pytest.raises(TypeError, match="sends a task or a signature"):
        asyncio.run(tr.aapply_async(lambda: None))


def test_a_revoke_while_the_result_is_stored_does_not_interrupt_the_store(worker_factory):
    """The store is slow (a delay proxy); a terminate lands during it: the SUCCESS is whole."""
    from benchmarks.proxy import DelayProxy

    proxy = DelayProxy(("127.0.0.1", 6379), delay_s=0.4).start()
    marks = f"{REDIS_URL.rsplit('/', 1)[0]}/13"
    try:
        backend_url = f"redis://127.0.0.1:{proxy.port}/15"
        with worker_factory(concurrency=4, include=INCLUDE, conf={"asyncsql_processes": 1},
                            env={"ITEST_BACKEND": backend_url, "ITEST_MARKS": marks}) as worker:
            key = f"mark-{uuid.uuid4().hex}"
            sent = worker.send(tr.noted_then_return, key, "whole")
            eventually(lambda: redis.Redis.from_url(marks).get(key), 30, "the body done")
            app.control.revoke(sent.id, terminate=True, signal="SIGTERM")
            worker.wait_for_log(f"Task {tr.noted_then_return.name}[{sent.id}] succeeded")
            meta = app.backend.get_task_meta(sent.id)
    finally:
        proxy.stop()
    assert (meta["status"], meta["result"]) == (states.SUCCESS, "whole")


@pytest.mark.parametrize("pool", ["prefork", "asyncsql"])
def test_a_result_too_large_for_the_backend_fails_the_task_as_on_prefork(worker_factory, pool):
    conf = {"asyncsql_processes": 1}
    with worker_factory(pool=pool, concurrency=2, include=f"{INCLUDE},tests.integration."
                        "tasks_too_large", conf=conf) as worker:
        task = tr.sync_sized if pool == "prefork" else tr.sized
        sent = worker.send(task, 50_000)
        with pytest.raises(BackendStoreError, match="value too large for Redis backend"):
            sent.get(timeout=30)
        assert worker.send(task, 10).get(timeout=30) == "x" * 10


# --- the script itself, against a real Redis ------------------------------------------------

SERIALIZERS = [("json", None), ("pickle", None), ("json", "zlib")]


def _backend(url: str, serializer: str, compression: str | None) -> RedisBackend:
    client = _client(url)
    client.conf.update(result_serializer=serializer, result_compression=compression,
                       result_accept_content=["json", "pickle"])
    backend = client.backend
    results.install(backend)
    return backend


@pytest.mark.parametrize(("serializer", "compression"), SERIALIZERS,
                         ids=["json", "pickle", "json-zlib"])
def test_a_stored_success_is_never_replaced_and_other_states_are(serializer, compression):
    with redis_server() as url:
        backend = _backend(url, serializer, compression)
        task_id = uuid.uuid4().hex
        backend.store_result(task_id, None, states.STARTED)
        backend.store_result(task_id, ValueError("first"), states.FAILURE)
        assert backend.get_task_meta(task_id)["status"] == states.FAILURE
        backend._cache.clear()
        backend.store_result(task_id, 42, states.SUCCESS)
        backend.store_result(task_id, KeyError("late"), states.FAILURE)
        backend.store_result(task_id, None, states.REVOKED)
        backend._cache.clear()
        meta = backend.get_task_meta(task_id)
        ttl = redis.Redis.from_url(url).ttl(backend.get_key_for_task(task_id))
        asynchronous = _async_store(backend, url)
    assert (meta["status"], meta["result"]) == (states.SUCCESS, 42)
    assert 0 < ttl <= 86400  # result_expires, one day by default
    assert asynchronous == (states.SUCCESS, 7)


def _async_store(backend: RedisBackend, url: str) -> tuple[str, object]:
    """The same rules through ``redis.asyncio``, as a worker child's tracer writes."""
    store = results.install(backend)
    writer = results.AsyncWriter(store)
    task_id = uuid.uuid4().hex
    key = backend.get_key_for_task(task_id).decode()

    def encoded(value, state):
        return backend.encode({"status": state, "result": value, "task_id": task_id})

    async def writes():
        for value, state in ((7, states.SUCCESS), (None, states.REVOKED)):
            await writer.write(key, encoded(value, state), 60)
        await writer.aclose()

    asyncio.run(writes())
    backend._cache.clear()
    meta = backend.get_task_meta(task_id)
    return meta["status"], meta["result"]


def test_a_parents_write_cannot_replace_a_success_stored_while_it_writes():
    """Celery's read-then-write lets a SUCCESS landing between the two be replaced: ours not."""
    with redis_server() as url:
        lost = _race(_client(url).backend, url)
        kept = _race(_backend(url, "json", None), url)
    assert lost == states.REVOKED, "stock Celery's store replaced the SUCCESS"
    assert kept == states.SUCCESS


def _race(backend: RedisBackend, url: str) -> str:
    """A child's SUCCESS lands just before the parent's REVOKED reaches Redis: what is left."""
    task_id = uuid.uuid4().hex
    other = _client(url).backend
    read = backend._get_task_meta_for

    def read_then_success_lands(*args, **kwargs):
        meta = read(*args, **kwargs)
        other.store_result(task_id, 1, states.SUCCESS)
        return meta

    backend._get_task_meta_for = read_then_success_lands
    store = getattr(backend, "_store_result")
    if isinstance(store, results.ResultStore):  # ours reads in the script: land it just before
        script = store._store

        def success_lands_then_script(*args, **kwargs):
            other.store_result(task_id, 1, states.SUCCESS)
            return script(*args, **kwargs)
        store._store = success_lands_then_script
    backend.store_result(task_id, None, states.REVOKED)
    backend._cache.clear()
    return backend.get_task_meta(task_id)["status"]


def test_a_flushed_script_is_loaded_again():
    with redis_server() as url:
        backend = _backend(url, "json", None)
        first, second = uuid.uuid4().hex, uuid.uuid4().hex
        backend.store_result(first, 1, states.SUCCESS)
        redis.Redis.from_url(url).script_flush()
        backend.store_result(second, 2, states.SUCCESS)
        assert [backend.get_task_meta(i)["result"] for i in (first, second)] == [1, 2]


def test_writes_made_at_once_on_a_loop_go_out_as_one_pipeline_on_one_connection():
    """Fifty tasks finishing in one loop iteration: one connection, and a flushed script reloaded."""
    with redis_server() as url:
        backend = _backend(url, "json", None)
        store = results.install(backend)
        writer = results.AsyncWriter(store)
        server = redis.Redis.from_url(url)
        meta = [backend.encode({"status": states.SUCCESS, "result": i, "task_id": str(i)})
                for i in range(100)]

        async def write_all(numbers):
            await asyncio.gather(*(writer.write(f"celery-task-meta-{i}", meta[i], 0)
                                   for i in numbers))

        async def main():
            before = server.info("stats")["total_connections_received"]
            await write_all(range(50))
            opened = server.info("stats")["total_connections_received"] - before
            server.script_flush()
            await write_all(range(50, 100))
            await writer.write("celery-task-meta-0", backend.encode({"status": "FAILURE"}), 0)
            await writer.aclose()
            return opened

        assert asyncio.run(main()) == 1
        assert [backend.get_task_meta(str(i))["result"] for i in range(100)] == list(range(100))
