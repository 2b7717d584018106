"""Child hooks for the integration tests, switched by environment variables."""

import asyncio
import os

from sqlalchemy import text

from celery_asyncpool import engine, on_child_start, on_child_stop

from .app import app

started = {}


@on_child_start
async def remember_start() -> None:
    started.update(pid=os.getpid(), loop=id(asyncio.get_running_loop()))
    if os.environ.get("ITEST_FAIL_START_HOOK"):
        raise RuntimeError("the start hook was told to fail")


@on_child_stop
async def record_stop() -> None:
    """Write a row on the child's loop, with its engine, as the child stops."""
    table = os.environ.get("ITEST_STOP_TABLE")
    if table:
        async with engine().begin() as conn:
            await conn.execute(text(f"INSERT INTO {table} (pid) VALUES (:pid)"),
                               {"pid": os.getpid()})


@app.task
async def hook_state():
    return {"started": started, "pid": os.getpid(), "loop": id(asyncio.get_running_loop())}
