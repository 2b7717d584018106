"""Tasks for test_uvloop: what loop a child runs them on."""

import asyncio
import os

from sqlalchemy import text

from celery_asyncpool import session

from .app import app


@app.task
async def loop_kind(seconds):
    """The running loop's class, after a database round trip and a wait on the loop."""
    async with session() as s:
        backend_pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    await asyncio.sleep(seconds)
    loop = asyncio.get_running_loop()
    return {"child": os.getpid(), "loop": f"{type(loop).__module__}.{type(loop).__qualname__}",
            "backend_pid": backend_pid}
