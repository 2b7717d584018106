"""Tasks for the fault suite: each leaves one row in ``fault_ledger`` per run of its body.

The row is the task's effect. Counting rows per task id tells a test how often
a task ran, across redeliveries, kills and retries.
"""

import asyncio
import os

from sqlalchemy import text

from celery_asyncpool import session
from tests.integration.app import app

INCLUDE = "tests.faults.tasks"  # the worker's include: add modules with a comma
LEDGER = """CREATE TABLE IF NOT EXISTS fault_ledger (
    run text NOT NULL, task_id text NOT NULL, pid int NOT NULL, at timestamptz DEFAULT now())"""


async def record(run: str, task_id: str) -> None:
    """Write the task's effect: one ledger row, committed."""
    async with session() as s:
        await s.execute(text("INSERT INTO fault_ledger (run, task_id, pid) VALUES (:r, :t, :p)"),
                        {"r": run, "t": task_id, "p": os.getpid()})
        await s.commit()


@app.task(bind=True)
async def effect(self, run: str, hold_s: float = 0.0) -> int:
    """Wait ``hold_s``, then write the effect; returns the child's pid."""
    await asyncio.sleep(hold_s)
    await record(run, self.request.id)
    return os.getpid()


@app.task
async def select_one(database: str = "default") -> int:
    """``SELECT 1`` on a named database: fails where that database cannot be reached."""
    async with session(database) as s:
        return int((await s.execute(text("SELECT 1"))).scalar_one())
