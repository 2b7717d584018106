"""Tasks for ``python -m benchmarks.loop_lag``: what a child's loop feels while its siblings work.

One child (``asyncsql_processes = 1``) runs them all: ``burn`` on the child's
sync thread, ``probe`` and ``queries`` as coroutines on its loop.
``LOOP_SWITCH_INTERVAL_S`` sets ``sys.setswitchinterval`` in the child.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from celery.signals import worker_process_init
from sqlalchemy import text

from celery_asyncpool import session

from .. import workloads
from ..workloads import summary
from . import make_app

DATABASE_URL = os.environ.get("LOOP_DATABASE_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")

app = make_app("bench_loop")
app.conf.asyncsql_database_url = DATABASE_URL
app.conf.asyncsql_processes = 1


@worker_process_init.connect
def _switch_interval(**_: object) -> None:
    interval = os.environ.get("LOOP_SWITCH_INTERVAL_S")
    if interval:
        sys.setswitchinterval(float(interval))


@app.task(name="loop.burn")
def burn(seconds: float) -> int:
    """Pure-Python CPU work on the child's sync thread for ``seconds``: it holds the GIL."""
    deadline = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < deadline:
        sum(range(1000))
        rounds += 1
    return rounds


@app.task(name="loop.probe")
async def probe(seconds: float, interval_s: float) -> dict[str, float]:
    """How late the loop runs a timer due every ``interval_s``, for ``seconds``."""
    return await workloads.timer_lags(seconds, interval_s)


@app.task(name="loop.queries")
async def queries(seconds: float) -> float:
    """``SELECT 1`` round trips per second on one pooled connection, for ``seconds``."""
    done = 0
    async with session() as s:
        await s.execute(text("SELECT 1"))
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            await s.execute(text("SELECT 1"))
            done += 1
    return done / (time.monotonic() - started)


@app.task(name="loop.noop")
def noop() -> None:
    return None


@app.task(name="loop.publish")
async def publish(count: int, queue: str, pause_s: float) -> dict[str, object]:
    """Publish ``count`` messages to ``queue`` from this coroutine; each call's time."""
    costs = []
    for _ in range(count):
        started = time.perf_counter()
        noop.apply_async(queue=queue)
        costs.append(time.perf_counter() - started)
        await asyncio.sleep(pause_s)
    return {"first": costs[0], "rest": summary(costs[1:])}
