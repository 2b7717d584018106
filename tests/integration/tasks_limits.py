"""Tasks for the time-limit, lost-child and revoke tests (DESIGN.md section 4, rows 9-13).

Each task records every start, as this child's pid pushed on a Redis list named
by a tag the test chooses, so a test knows which child runs which task and
whether (and how often) a task ran at all. Async tasks have sync twins for
stock prefork.
"""

import asyncio
import os
import time

import redis
import redis.asyncio
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import text

from celery_asyncpool import session

from .app import BROKER_URL, app

RUNS_URL = BROKER_URL
RUNS_TTL_S = 600


def runs_key(tag):
    return f"itest-limits:{tag}"


def _record(tag):
    with redis.Redis.from_url(RUNS_URL) as client:
        client.rpush(runs_key(tag), os.getpid())
        client.expire(runs_key(tag), RUNS_TTL_S)


async def _arecord(tag):
    client = redis.asyncio.Redis.from_url(RUNS_URL)
    try:
        await client.rpush(runs_key(tag), os.getpid())
        await client.expire(runs_key(tag), RUNS_TTL_S)
    finally:
        await client.aclose()


@app.task
async def async_mark_sleep(tag, seconds):
    await _arecord(tag)
    await asyncio.sleep(seconds)
    return os.getpid()


@app.task
def sync_mark_sleep(tag, seconds):
    _record(tag)
    time.sleep(seconds)
    return os.getpid()


@app.task(soft_time_limit=1)
async def async_mark_handles_soft(tag, seconds):
    """Soft limit from the task's options; handles the cancellation it causes."""
    await _arecord(tag)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError as exc:
        return f"handled: {exc.args[0] if exc.args else ''}"
    return "finished"


@app.task(soft_time_limit=1)
def sync_mark_handles_soft(tag, seconds):
    _record(tag)
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded as exc:
        return f"handled: {type(exc).__name__}"
    return "finished"


@app.task(soft_time_limit=1)
def sync_waits_on_async_body(tag, seconds):
    """A sync task that calls into the loop: an async task's body, run to completion here."""
    _record(tag)
    return async_mark_sleep(f"{tag}-body", seconds)


@app.task
async def async_session_sleep(tag, seconds):
    """Hold a pooled connection in a server-side ``pg_sleep``."""
    await _arecord(tag)
    async with session() as s:
        await s.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
    return "finished"


@app.task
async def async_session_pid(delay_s):
    """After ``delay_s`` (so that concurrent calls spread over idle children), query."""
    await asyncio.sleep(delay_s)
    async with session() as s:
        backend = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    return {"child": os.getpid(), "backend": backend}
