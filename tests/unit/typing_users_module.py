"""Checked by mypy --strict, with and without celery-types (test_typing), never run: a user's
typed task module, as the README writes one."""

from __future__ import annotations

from celery import Celery
from sqlalchemy import text

from celery_asyncpool import AsyncTask, engine, session

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
