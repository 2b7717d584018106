"""The web side, from a loop of its own as a web server's: results awaited with ``aget``
(Redis pub/sub, or polling on other backends), and tasks sent when a transaction commits
with ``send_on_commit``; against a real worker, Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest
import redis
from celery import group
from celery.backends.database import DatabaseBackend
from celery.exceptions import TimeoutError as CeleryTimeoutError
from sqlalchemy import text

from celery_asyncpool import open_databases, session
from celery_asyncpool.awaiting import SUBTASK_DEADLOCK, aget
from celery_asyncpool.on_commit import send_on_commit

from . import tasks, tasks_web
from .app import BACKEND_URL, app
from .conftest import PG_DSN

INCLUDE = "tests.integration.tasks,tests.integration.tasks_web"


@pytest.fixture(scope="module")
def rows_table():
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {tasks_web.TABLE} (id bigint PRIMARY KEY)")


def test_results_are_awaited_with_gets_states_and_the_loop_runs_on(worker_factory):
    with worker_factory(concurrency=4, include=INCLUDE) as worker:
        async def scenario():
            ticks: list[float] = []

            async def ticker():
                while True:
                    ticks.append(time.monotonic())
                    await asyncio.sleep(0.02)

            ticking = asyncio.create_task(ticker())
            slow = worker.send(tasks.async_sleep, 1.5)
            waiters = await asyncio.gather(*(aget(slow, timeout=30) for _ in range(200)))
            ticking.cancel()
            failed = worker.send(tasks.async_retry)
            with pytest.raises(ValueError, match="attempt 2"):
                await aget(failed, timeout=30)
            as_value = await aget(failed, timeout=30, propagate=False)
            with pytest.raises(CeleryTimeoutError):
                await aget(worker.send(tasks.async_sleep, 5), timeout=0.3)
            grouped = group(tasks.async_add.s(i, i) for i in range(5)).apply_async(
                queue=worker.queue)
            return waiters, ticks, as_value, await aget(grouped, timeout=30)

        waiters, ticks, as_value, grouped = asyncio.run(scenario())
    assert waiters == [1.5] * 200, "each of 200 waiters woken once with the value"
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 30 and max(gaps) < 0.5, f"the loop stalled {max(gaps):.2f}s"
    assert isinstance(as_value, ValueError)
    assert grouped == [0, 2, 4, 6, 8]


def test_a_wait_survives_its_pubsub_connection_killed(worker_factory):
    with worker_factory(concurrency=2, include=INCLUDE) as worker:
        async def scenario():
            result = worker.send(tasks.async_sleep, 2)
            waiting = asyncio.create_task(aget(result, timeout=30))
            await asyncio.sleep(0.5)
            killed = redis.Redis.from_url(BACKEND_URL).client_kill_filter(_type="pubsub")
            return killed, await waiting

        killed, value = asyncio.run(scenario())
    assert killed >= 1
    assert value == 2  # woken by the SUCCESS stored after the kill


def test_other_backends_are_polled(worker_factory):
    url = "db+postgresql+psycopg://postgres@127.0.0.1:5432/test"
    with worker_factory(concurrency=2, include=INCLUDE, conf={"result_backend": url}) as worker:
        backend = DatabaseBackend(app=app, url=url.removeprefix("db+"))
        sent = worker.send(tasks.async_add, 20, 22)
        value = asyncio.run(aget(app.AsyncResult(sent.id, backend=backend), timeout=30,
                                 interval=0.1))
    assert value == 42


def test_a_task_that_awaits_a_subtask_is_refused_unless_it_says_so(worker_factory):
    with worker_factory(concurrency=4, include=INCLUDE) as worker:
        refused = worker.send(tasks_web.awaits_a_subtask)
        with pytest.raises(RuntimeError) as raised:
            refused.get(timeout=30)
        allowed = worker.send(tasks_web.awaits_a_subtask, True).get(timeout=30)
    assert str(raised.value) == SUBTASK_DEADLOCK and "deadlocks" in SUBTASK_DEADLOCK
    assert allowed == 3


def test_sends_wait_for_the_commit_and_never_follow_a_rollback(worker_factory, rows_table):
    with worker_factory(concurrency=4, include=INCLUDE) as worker:
        async def scenario():
            async with open_databases(app):
                base = int(time.time() * 1000) * 10
                async with session() as s:
                    await s.execute(text(f"INSERT INTO {tasks_web.TABLE} VALUES (:id)"),
                                    {"id": base})
                    committed = [send_on_commit(s, tasks_web.row_exists.s(base),
                                                queue=worker.queue) for _ in range(3)]
                    order: list[int] = []
                    for n, future in enumerate(committed):
                        future.add_done_callback(lambda _, n=n: order.append(n))
                    await asyncio.sleep(0.2)
                    pending_before_commit = [f.done() for f in committed]
                    await s.commit()
                found = [await aget(await f, timeout=30) for f in committed]

                async with session() as s:
                    await s.execute(text(f"INSERT INTO {tasks_web.TABLE} VALUES (:id)"),
                                    {"id": base + 1})
                    rolled_back = send_on_commit(s, tasks_web.row_exists.s(base + 1),
                                                 queue=worker.queue)
                    await s.rollback()
                async with session() as s:
                    closed = send_on_commit(s, tasks_web.row_exists.s(base + 2),
                                            queue=worker.queue)
                async with session() as s:
                    await s.execute(text(f"INSERT INTO {tasks_web.TABLE} VALUES (:id)"),
                                    {"id": base + 3})
                    savepoint = await s.begin_nested()
                    in_savepoint = send_on_commit(s, tasks_web.row_exists.s(base + 3),
                                                  queue=worker.queue)
                    await savepoint.rollback()
                    released = await s.begin_nested()
                    kept = send_on_commit(s, tasks_web.row_exists.s(base + 3),
                                          queue=worker.queue)
                    await released.commit()
                    kept_after_release = kept.done()
                    await s.commit()
                kept_found = await aget(await kept, timeout=30)
                return (pending_before_commit, found, order, rolled_back.cancelled(),
                        closed.cancelled(), in_savepoint.cancelled(), kept_after_release,
                        kept_found)

        outcome = asyncio.run(scenario())
        queued = worker.queued()
    (pending, found, order, rolled_back, closed, in_savepoint, kept_early, kept_found) = outcome
    assert pending == [False, False, False], "nothing is sent before the commit"
    assert found == [True, True, True], "each task finds the committed row"
    assert order == [0, 1, 2], "the sends of one commit go out in order"
    assert rolled_back and closed and in_savepoint, "no send without a commit"
    assert not kept_early and kept_found, "a released savepoint's send waits for the commit"
    assert queued == 0


def test_a_send_that_fails_after_the_commit_is_raised_to_the_caller_and_logged(caplog):
    from celery import Celery

    refusing = Celery("refused", broker="redis://127.0.0.1:1/0", backend=None)

    @refusing.task(name="nothing")
    def nothing():
        return None

    async def scenario():
        async with open_databases(app):
            async with session() as s:
                future = send_on_commit(s, nothing.s(), retry=False)
                await s.commit()
            with pytest.raises(Exception) as raised:
                await future
            return raised.value

    error = asyncio.run(scenario())
    assert "Connection refused" in str(error) or "Error 111" in str(error)
    assert "Task nothing was not sent after its transaction committed" in caplog.text
