"""Engines inherited over fork: each one the parent connected gets a fresh pool in the child,
and the parent's connections are left alone."""

from __future__ import annotations

import asyncio
import json
import os

from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from celery_asyncpool.databases import fork


def _in_child(work) -> dict:
    """Run ``work()`` in a forked child; what it returned, as JSON."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        try:
            outcome = work()
        except BaseException as exc:
            outcome = {"error": repr(exc)}
        os.write(write_fd, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        data = reader.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def test_a_connection_checked_out_at_fork_stays_the_parents(tmp_path):
    fork.watch_engines()
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}", poolclass=QueuePool,
                           pool_size=2, max_overflow=1)
    held = engine.connect()  # checked out in the parent at fork time
    engine.connect().close()  # and one waiting in the pool's queue
    held.execute(text("CREATE TABLE t (x INTEGER)"))
    held.commit()
    inherited_pool = engine.pool
    assert (inherited_pool.checkedout(), inherited_pool.checkedin()) == (1, 1)

    def child() -> dict:
        reset = fork.make_inherited_engines_safe()
        pool = engine.pool
        seen = {"reset": reset, "fresh": pool is not inherited_pool,
                "checked_out": pool.checkedout(), "queued": pool.checkedin(),
                "overflow": pool.overflow()}
        with engine.connect() as connection:
            seen["works"] = connection.execute(text("SELECT count(*) FROM t")).scalar_one()
        return seen

    seen = _in_child(child)
    assert seen == {"reset": seen["reset"], "fresh": True, "checked_out": 0, "queued": 0,
                    "overflow": -2, "works": 0}
    assert seen["reset"] >= 1
    # The parent's pool and its checked-out connection are as they were.
    assert engine.pool is inherited_pool
    assert held.execute(text("SELECT count(*) FROM t")).scalar_one() == 0
    held.close()
    engine.dispose()


def test_a_users_async_engine_is_noted_when_it_connects(tmp_path):
    fork.watch_engines()
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'y.db'}")
    assert engine.sync_engine not in fork._engines  # never connected: nothing to hand over

    async def use_then_fork() -> dict:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        assert engine.sync_engine in fork._engines
        inherited_pool = engine.sync_engine.pool
        seen = _in_child(lambda: {"reset": fork.make_inherited_engines_safe(),
                                  "fresh": engine.sync_engine.pool is not inherited_pool})
        await engine.dispose()
        return seen

    seen = asyncio.run(use_then_fork())
    assert seen["fresh"] and seen["reset"] >= 1
