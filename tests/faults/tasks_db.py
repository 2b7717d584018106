"""Tasks for the database-outage faults: one transaction that holds a connection, then
writes the task's effect.

A task that should ride out its database going away lists
``celery_asyncpool.retry.DATABASE_ERRORS`` in ``autoretry_for``: an outage
reaches the body as ``DBAPIError``, as an unwrapped ``OSError`` or as an
unwrapped asyncpg error, depending on when the connection goes (that module
says which when). ``DBAPIError`` alone, or ``OperationalError``, misses some.
"""

import os

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from celery_asyncpool import session
from celery_asyncpool.retry import DATABASE_ERRORS
from tests.integration.app import app


async def _hold_then_record(run: str, task_id: str, hold_s: float) -> int:
    """Hold a connection ``hold_s`` in a transaction, then write the effect in it."""
    async with session() as s, s.begin():
        await s.execute(text("SELECT pg_sleep(:h)"), {"h": hold_s})
        await s.execute(text("INSERT INTO fault_ledger (run, task_id, pid) VALUES (:r, :t, :p)"),
                        {"r": run, "t": task_id, "p": os.getpid()})
    return os.getpid()


@app.task(bind=True, autoretry_for=DATABASE_ERRORS, dont_autoretry_for=(IntegrityError,),
          max_retries=10, default_retry_delay=1)
async def db_effect(self, run: str, hold_s: float = 0.0) -> int:
    """Write the effect in one transaction; retry, 1 s apart, while the database is away."""
    return await _hold_then_record(run, self.request.id, hold_s)


@app.task(bind=True)
async def db_effect_no_retry(self, run: str, hold_s: float = 0.0) -> int:
    """The same work without ``autoretry_for``: a database error is the stored outcome."""
    return await _hold_then_record(run, self.request.id, hold_s)
