"""The fleet's mixed batch: each task writes its effect, one ``fleet_ledger`` row naming the
worker that ran it, in the same transaction as its work.

Counting rows per task id tells how often a task's work was committed, across hosts,
redeliveries and retries. Whether they are acknowledged late is the worker's setting
(``task_acks_late``), which each test chooses. Each first waits ``hold_s`` outside any
transaction, so that a host has tasks in flight when it is cut.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import ForeignKey, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_asyncpool import session
from celery_asyncpool.retry import DATABASE_ERRORS
from tests.integration.app import app

INCLUDE = "tests.fleet.tasks"
# As a production task would: retried, not failed, while its host cannot reach the database.
RETRIED = {"autoretry_for": DATABASE_ERRORS, "max_retries": 10, "retry_backoff": 1,
           "retry_backoff_max": 4, "retry_jitter": False}
ACCOUNTS = 50  # rows the read-modify-commit tasks share (row locks contend, as in production)
SCHEMA = [
    "CREATE TABLE IF NOT EXISTS fleet_account (id int PRIMARY KEY, balance int NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fleet_ledger (run text NOT NULL, task_id text NOT NULL, "
    "kind text NOT NULL, worker text NOT NULL, account int REFERENCES fleet_account (id))",
    "INSERT INTO fleet_account (id, balance) SELECT n, 0 FROM generate_series(0, "
    f"{ACCOUNTS}) AS n ON CONFLICT DO NOTHING",
]


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "fleet_account"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


class Entry(Base):
    __tablename__ = "fleet_ledger"
    task_id: Mapped[str] = mapped_column(primary_key=True)  # for the ORM only: no such key
    run: Mapped[str]
    kind: Mapped[str]
    worker: Mapped[str]
    account: Mapped[int | None] = mapped_column(ForeignKey("fleet_account.id"))


def _entry(task, run: str, kind: str, account: int | None = None) -> Entry:
    return Entry(run=run, task_id=task.request.id, kind=kind, worker=task.request.hostname,
                 account=account)


async def _commit(s: AsyncSession, entry: Entry) -> None:
    s.add(entry)
    await s.commit()


@app.task(bind=True, **RETRIED)
async def read_modify_commit(self, run: str, account: int, hold_s: float = 0.0) -> int:
    """Lock an account row, add one to it, commit it with the effect."""
    await asyncio.sleep(hold_s)
    async with session() as s:
        row = await s.get(Account, account, with_for_update=True)
        assert row is not None, f"account {account} is not there"
        row.balance += 1
        await _commit(s, _entry(self, run, "read-modify-commit", account))
        return row.balance


@app.task(bind=True, **RETRIED)
async def sleep_20ms(self, run: str, hold_s: float = 0.0) -> None:
    """A 20 ms ``pg_sleep`` in the transaction that writes the effect."""
    await asyncio.sleep(hold_s)
    async with session() as s:
        await s.execute(text("SELECT pg_sleep(0.02)"))
        await _commit(s, _entry(self, run, "pg_sleep"))


@app.task(bind=True, **RETRIED)
async def rollback_on_error(self, run: str, hold_s: float = 0.0) -> None:
    """A write that fails (a duplicate key), rolled back; then the effect, committed."""
    await asyncio.sleep(hold_s)
    async with session() as s:
        try:
            await s.execute(text("INSERT INTO fleet_account (id, balance) VALUES (0, 0)"))
        except IntegrityError:
            await s.rollback()
        else:
            raise AssertionError("account 0 is there: the insert must fail")
        await _commit(s, _entry(self, run, "rollback"))


@app.task(bind=True, **{**RETRIED, "default_retry_delay": 0.1})
async def retry_once(self, run: str, hold_s: float = 0.0) -> None:
    """Retries once (a new message, maybe to another host), then writes the effect."""
    if self.request.retries == 0:
        raise self.retry()
    await asyncio.sleep(hold_s)
    async with session() as s:
        await _commit(s, _entry(self, run, "retry"))


@app.task
async def connection_name(hold_s: float) -> str:
    """The ``application_name`` of the connection the task holds for ``hold_s``."""
    async with session() as s:
        await s.execute(text("SELECT pg_sleep(:s)"), {"s": hold_s})
        return str((await s.execute(text("SELECT current_setting('application_name')")))
                   .scalar_one())
