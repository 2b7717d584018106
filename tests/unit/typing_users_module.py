"""Checked by mypy --strict, with and without celery-types (test_typing), never run: a user's
typed task module, as the README writes one."""

from __future__ import annotations

import asyncio
from typing import Any

from celery import Celery
from celery.result import AsyncResult
from sqlalchemy import text

from celery_asyncpool import AsyncTask, aget, engine, send_on_commit, session

app = Celery("users", task_cls="celery_asyncpool:AsyncTask")


@app.task(bind=True, base=AsyncTask, max_retries=3)
async def activate(self: AsyncTask, user_id: int) -> str:
    async with session() as s:
        status = (await s.execute(text("SELECT 'active'"))).scalar_one()
        await s.commit()
    self.request.id  # noqa: B018
    return str(status)


@app.task(base=AsyncTask)
async def server_version() -> str:
    async with engine().connect() as connection:
        return str((await connection.execute(text("SHOW server_version"))).scalar_one())


def send() -> None:
    activate.delay(42)
    server_version.delay()


async def create_then_await(user_id: int) -> str:
    """A web handler's: send on commit, then await the result without blocking the loop."""
    async with session() as s:
        await s.execute(text("SELECT 1"))
        sent: asyncio.Future[AsyncResult[Any]] = send_on_commit(s, activate.s(user_id))
        await s.commit()
    result = await sent
    return str(await aget(result, timeout=10))
