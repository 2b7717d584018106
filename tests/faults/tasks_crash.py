"""Tasks for child kills and broker drops: they also note each start, so a test sees redeliveries.

A start row goes to the ledger under ``starts(run)``, the effect under ``run``:
a task with two start rows was delivered twice, whether or not its first run
got as far as its effect. ``sync_marked_effect`` is the sync twin, for stock prefork.
"""

import asyncio
import os
import time

import psycopg

from tests.integration.app import app
from tests.integration.conftest import PG_DSN

from .tasks import record

INCLUDE = "tests.faults.tasks,tests.faults.tasks_crash"


def starts(run: str) -> str:
    """The ledger run name under which the tasks of ``run`` note their starts."""
    return f"{run}/start"


async def _marked(task_id: str, run: str, hold_s: float) -> int:
    await record(starts(run), task_id)
    await asyncio.sleep(hold_s)
    await record(run, task_id)
    return os.getpid()


@app.task(bind=True)
async def marked_effect(self, run: str, hold_s: float) -> int:
    """Note the start, wait ``hold_s``, write the effect; returns the child's pid."""
    return await _marked(self.request.id, run, hold_s)


@app.task(bind=True, acks_late=True)
async def marked_effect_late(self, run: str, hold_s: float) -> int:
    """``marked_effect``, acknowledged after it ends (``acks_late``)."""
    return await _marked(self.request.id, run, hold_s)


_connections: dict[int, psycopg.Connection] = {}  # one per process, as a pool keeps one


def _sync_record(run: str, task_id: str) -> None:
    conn = _connections.get(os.getpid())
    if conn is None or conn.closed:
        conn = _connections[os.getpid()] = psycopg.connect(PG_DSN, autocommit=True)
    conn.execute("INSERT INTO fault_ledger (run, task_id, pid) VALUES (%s, %s, %s)",
                 (run, task_id, os.getpid()))


@app.task(bind=True)
def sync_marked_effect(self, run: str, hold_s: float) -> int:
    """``marked_effect`` as a sync task, for stock prefork."""
    _sync_record(starts(run), self.request.id)
    time.sleep(hold_s)
    _sync_record(run, self.request.id)
    return os.getpid()


@app.task(bind=True, acks_late=True)
def sync_marked_effect_late(self, run: str, hold_s: float) -> int:
    """``sync_marked_effect``, acknowledged after it ends (``acks_late``)."""
    _sync_record(starts(run), self.request.id)
    time.sleep(hold_s)
    _sync_record(run, self.request.id)
    return os.getpid()
