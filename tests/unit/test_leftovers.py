"""What a task body leaves behind: pending Tasks cancelled, open sessions closed, each named."""

import asyncio
import contextvars
import logging

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from celery_asyncpool.child import leftovers
from celery_asyncpool.databases.api import noted


async def _in_watched_body(body):
    """Run ``body()`` as a job's body Task is run; return its leftovers."""
    leftovers.install_task_factory(asyncio.get_running_loop())
    context = contextvars.copy_context()
    left = leftovers.watch(context)
    await asyncio.get_running_loop().create_task(body(), context=context)
    return left


def test_tasks_a_body_leaves_pending_are_cancelled_and_named(caplog):
    async def forgotten():
        await asyncio.sleep(30)

    async def main():
        started = {}

        async def body():
            started["forgotten"] = asyncio.create_task(forgotten())
            await asyncio.create_task(asyncio.sleep(0))  # awaited: not a leftover

        left = await _in_watched_body(body)
        bystander = asyncio.create_task(forgotten())  # outside any body
        assert left.tasks == {started["forgotten"]}
        await leftovers.clean_up(left, "t.job[1]", grace_s=1)
        assert started["forgotten"].cancelled()
        assert not bystander.done()
        bystander.cancel()

    with caplog.at_level(logging.WARNING, logger=leftovers.__name__):
        asyncio.run(main())
    [warning] = caplog.messages
    assert "Task t.job[1] returned while 1 asyncio Task(s)" in warning
    assert "(test_tasks_a_body_leaves_pending_are_cancelled_and_named.<locals>.forgotten)" \
        in warning
    assert "Await them" in warning


def test_tasks_of_a_cancelled_body_are_left_alone(caplog):
    async def main():
        async def body():
            asyncio.create_task(asyncio.sleep(30))

        left = await _in_watched_body(body)
        await leftovers.clean_up(left, "t.job[2]", grace_s=1, cancel_tasks=False)
        [pending] = left.tasks
        assert not pending.done()
        pending.cancel()

    asyncio.run(main())
    assert caplog.messages == []


def test_sessions_left_in_a_transaction_are_closed_and_their_connections_returned(
        tmp_path, caplog):
    async def main():
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
        maker = async_sessionmaker(engine)

        async def body():
            leaked = maker()
            noted(leaked)
            await leaked.execute(text("SELECT 1"))
            async with maker() as closed:
                noted(closed)
                await closed.execute(text("SELECT 1"))

        left = await _in_watched_body(body)
        assert engine.pool.checkedout() == 1
        await leftovers.clean_up(left, "t.job[3]", grace_s=1)
        assert engine.pool.checkedout() == 0
        assert not left.sessions[0].in_transaction()
        await engine.dispose()

    with caplog.at_level(logging.WARNING, logger=leftovers.__name__):
        asyncio.run(main())
    [warning] = caplog.messages
    assert "Task t.job[3] returned with 1 session(s) still in a transaction" in warning
    assert "`async with session() as s:`" in warning


def test_the_factory_keeps_a_factory_set_before_it():
    made = []

    def previous(loop, coro, **kwargs):
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(previous)
        leftovers.install_task_factory(loop)
        await asyncio.create_task(asyncio.sleep(0))

    asyncio.run(main())
    assert made[0].__qualname__ == "sleep"


@pytest.mark.parametrize("cancel_tasks", [True, False])
def test_nothing_left_logs_nothing(caplog, cancel_tasks):
    async def main():
        async def body():
            await asyncio.sleep(0)

        left = await _in_watched_body(body)
        await leftovers.clean_up(left, "t.job[4]", grace_s=1, cancel_tasks=cancel_tasks)

    asyncio.run(main())
    assert caplog.messages == []
