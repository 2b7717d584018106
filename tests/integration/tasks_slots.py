"""Tasks for several slots per child: each reports where and when it ran."""

import asyncio
import os
import time

from sqlalchemy import text

from celery_asyncpool import session

from .app import app


@app.task
async def span(seconds):
    """Wait ``seconds`` on the loop; report the child and the interval."""
    started = time.time()
    await asyncio.sleep(seconds)
    return {"child": os.getpid(), "start": started, "end": time.time()}


@app.task
async def db_span(seconds):
    """Hold a pooled connection for ``seconds`` in a server-side ``pg_sleep``."""
    started = time.time()
    async with session() as s:
        await s.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
    return {"child": os.getpid(), "start": started, "end": time.time()}


@app.task
async def stubborn(seconds):
    """Ignore every cancellation until ``seconds`` have passed: a task that will not stop."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(deadline - time.monotonic())
        except asyncio.CancelledError:
            continue
    return os.getpid()


@app.task
async def blocks(seconds):
    """Block the loop for ``seconds``: no cancellation can reach it."""
    time.sleep(seconds)
    return os.getpid()


@app.task(bind=True)
async def retry_then_linger(self, linger_s):
    """Retry with no countdown, then take ``linger_s`` before the tracer stores RETRY."""
    if not self.request.retries:
        retry = self.retry(countdown=0, throw=False)  # the new message is sent now
        await asyncio.sleep(linger_s)
        raise retry
    return {"child": os.getpid(), "start": time.time()}
