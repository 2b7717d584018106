"""The same tasks as native ``async def`` on ``-P asyncsql``: the child's loop, engine and pool."""

from __future__ import annotations

from celery_asyncpool import session

from .. import workloads
from ..settings import ASYNC_URL
from . import make_app

app = make_app("bench_asyncsql")
app.conf.asyncsql_database_url = ASYNC_URL
app.conf.asyncsql_processes = 2  # the same children on any machine; -c sets the slots


@app.task(name="bench.tiny")
async def tiny() -> int:
    async with session() as s:
        return await workloads.tiny(s)


@app.task(name="bench.orm")
async def orm(user_id: int) -> int:
    async with session() as s:
        return await workloads.orm(s, user_id)


@app.task(name="bench.io")
async def io() -> None:
    async with session() as s:
        await workloads.io(s)


@app.task(name="bench.noop")
async def noop() -> None:
    return None
