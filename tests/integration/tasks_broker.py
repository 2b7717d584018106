"""Tasks for broker connection loss: each writes a row when it starts, ends or is cancelled.

The rows go to ``broker_events`` in PostgreSQL, so a test counts how often a
task ran and how often its coroutine saw ``CancelledError``, across
redeliveries. ``sync_hold`` and ``sync_hold_late`` are the sync twins, for stock prefork.
"""

import asyncio
import os
import time

import psycopg
from sqlalchemy import text

from celery_asyncpool import session

from .app import app
from .conftest import PG_DSN

TABLE = """CREATE TABLE IF NOT EXISTS broker_events (
    task_id text NOT NULL, kind text NOT NULL, pid int NOT NULL, at timestamptz DEFAULT now())"""
INSERT = "INSERT INTO broker_events (task_id, kind, pid) VALUES (%s, %s, %s)"


async def _note(task_id, kind):
    async with session() as s:
        await s.execute(text("INSERT INTO broker_events (task_id, kind, pid) "
                             "VALUES (:t, :k, :p)"), {"t": task_id, "k": kind, "p": os.getpid()})
        await s.commit()


async def _hold(task, seconds):
    task_id = task.request.id
    await _note(task_id, "start")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        await _note(task_id, "cancelled")
        raise
    await _note(task_id, "end")
    return os.getpid()


@app.task(bind=True)
async def hold(self, seconds):
    """Wait ``seconds``; acked when it starts."""
    return await _hold(self, seconds)


@app.task(bind=True, acks_late=True)
async def hold_late(self, seconds):
    """Wait ``seconds``; acked after it ends (``acks_late``)."""
    return await _hold(self, seconds)


def _sync_hold(task, seconds):
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(INSERT, (task.request.id, "start", os.getpid()))
    time.sleep(seconds)  # prefork terminates the process: no row for a cancel
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(INSERT, (task.request.id, "end", os.getpid()))
    return os.getpid()


@app.task(bind=True)
def sync_hold(self, seconds):
    return _sync_hold(self, seconds)


@app.task(bind=True, acks_late=True)
def sync_hold_late(self, seconds):
    return _sync_hold(self, seconds)
