"""The common pattern today: a sync task that calls ``asyncio.run()``, on a ``NullPool`` engine.

``NullPool`` is what makes it work at all: a pooled engine used from a new
loop per task fails from the second task ("attached to a different loop").
Every task pays for a new loop and a new database connection.

The engine's first connection is made once at worker start: SQLAlchemy runs
the dialect's first-connect set-up under an asyncio lock, and under
``-P threads`` several first tasks on their own loops would otherwise fail
with "bound to a different event loop" or wait on that lock forever.
"""

from __future__ import annotations

import asyncio

from celery.signals import worker_init
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from .. import workloads
from ..settings import ASYNC_URL
from . import make_app

app = make_app("bench_common")
engine = create_async_engine(ASYNC_URL, poolclass=NullPool)


async def _in_session(work, *args):  # type: ignore[no-untyped-def]
    async with AsyncSession(engine, expire_on_commit=False) as session:
        return await work(session, *args)


@worker_init.connect
def _first_connect(**_: object) -> None:
    asyncio.run(_in_session(workloads.tiny))


@app.task(name="bench.tiny")
def tiny() -> int:
    return asyncio.run(_in_session(workloads.tiny))


@app.task(name="bench.orm")
def orm(user_id: int) -> int:
    return asyncio.run(_in_session(workloads.orm, user_id))


@app.task(name="bench.io")
def io() -> None:
    asyncio.run(_in_session(workloads.io))


@app.task(name="bench.noop")
def noop() -> None:
    return None
