"""Bad input for the fault suite: async tasks that break one rule of the loop each.

Each writes its effect (``record``) first, so the ledger tells which child ran it.
"""

import asyncio
import os
import time

from sqlalchemy import text

from celery_asyncpool import session
from tests.integration.app import app

from .tasks import record


class Unpicklable(Exception):
    """An exception that pickles but cannot be unpickled: ``__init__`` takes two arguments."""

    def __init__(self, table: str, row: int) -> None:
        super().__init__(f"row {row} of {table} is bad")
        self.table, self.row = table, row


@app.task(bind=True)
async def blocks_loop(self, run: str, seconds: float) -> int:
    await record(run, self.request.id)
    time.sleep(seconds)  # blocks the loop
    return os.getpid()


@app.task(bind=True)
async def swallows_cancel(self, run: str, seconds: float) -> int:
    """Catch every cancellation and go on until ``seconds`` have passed."""
    await record(run, self.request.id)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(deadline - time.monotonic())
        except asyncio.CancelledError:
            pass  # swallowed
    return os.getpid()


@app.task(bind=True)
async def returns_unserializable(self, run: str) -> object:
    await record(run, self.request.id)
    return object()


@app.task(bind=True)
async def raises_unpicklable(self, run: str) -> None:
    await record(run, self.request.id)
    raise Unpicklable("accounts", 7)


@app.task(bind=True)
async def leaves_session_open(self, run: str) -> int:
    """Query in a session, then return without closing it: its transaction stays open."""
    await record(run, self.request.id)
    s = session()
    await s.execute(text("SELECT 1"))
    return os.getpid()


async def forgotten(run: str, task_id: str, seconds: float) -> None:
    """Write the task's effect a second time, unless cancelled within ``seconds``."""
    await asyncio.sleep(seconds)
    await record(run, task_id)


@app.task(bind=True)
async def leaves_task_running(self, run: str, seconds: float) -> int:
    """Start an asyncio Task and return without awaiting it."""
    await record(run, self.request.id)
    asyncio.create_task(forgotten(run, self.request.id, seconds))  # never awaited
    return os.getpid()
