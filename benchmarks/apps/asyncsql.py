"""The same tasks as native ``async def`` on ``-P asyncsql``: the child's loop, engine and pool."""

from __future__ import annotations

from celery_asyncpool import session

from .. import workloads
from ..settings import ASYNC_URL, PROCESSES, RESULTS_OFF_LOOP
from . import make_app

app = make_app("bench_asyncsql")
app.conf.asyncsql_database_url = ASYNC_URL
app.conf.asyncsql_processes = PROCESSES  # the same children on any machine; -c sets the slots
app.conf.asyncsql_results_off_loop = RESULTS_OFF_LOOP


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


@app.task(name="bench.big")
async def big(size: int) -> str:
    """A result of ``size`` characters: a store that takes the backend a while."""
    return "x" * size


@app.task(name="bench.lag")
async def lag(seconds: float, interval_s: float) -> dict[str, float]:
    """How late this child's loop runs a timer due every ``interval_s``, for ``seconds``."""
    return await workloads.timer_lags(seconds, interval_s)
