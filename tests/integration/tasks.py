"""Tasks shared by the integration tests: each async task has a sync twin for prefork."""

import asyncio
import logging
import os
import threading
import time

from celery import current_task
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from sqlalchemy import text

from celery_asyncpool import session

from .app import app

logger = logging.getLogger(__name__)


@app.task
async def async_add(x, y):
    await asyncio.sleep(0)
    return x + y


@app.task
def sync_add(x, y):
    return x + y


@app.task
def sync_where():
    """Where a sync task runs: on the child's main thread, with no event loop running."""
    return {"pid": os.getpid(), "thread": threading.current_thread().name,
            "loop_running": asyncio.events._get_running_loop() is not None}


@app.task
async def backend_pid():
    """The PostgreSQL backend pid, this child's pid and its loop's identity."""
    async with session() as s:
        pid = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    return {"backend": pid, "child": os.getpid(), "loop": id(asyncio.get_running_loop()),
            "thread": threading.current_thread().name}


@app.task
async def async_unserializable():
    return object()


@app.task
def sync_unserializable():
    return object()


@app.task(bind=True)
async def identity(self, delay_s=0.01):
    """Request identity seen before and after awaits, also from a thread."""
    seen = []
    for _ in range(3):
        seen.append((self.request.id, self.request.retries, current_task.request.id))
        logger.info("identity-log %s", self.request.id)
        await asyncio.sleep(delay_s)
    seen.append(await asyncio.to_thread(lambda: (self.request.id, self.request.retries,
                                                 current_task.request.id)))
    return {"expected": self.request.id, "seen": seen,
            "delivery_info": self.request.delivery_info.get("routing_key")}


@app.task(bind=True, max_retries=2, default_retry_delay=0)
async def async_retry(self):
    await asyncio.sleep(0)
    raise self.retry(exc=ValueError(f"attempt {self.request.retries}"))


@app.task(bind=True, max_retries=2, default_retry_delay=0)
def sync_retry(self):
    raise self.retry(exc=ValueError(f"attempt {self.request.retries}"))


@app.task(bind=True, max_retries=3, default_retry_delay=0)
async def retry_then_succeed(self):
    if self.request.retries < 2:
        raise self.retry()
    return self.request.retries


@app.task(autoretry_for=(KeyError,), max_retries=2, default_retry_delay=0, bind=True)
async def async_autoretry(self):
    await asyncio.sleep(0)
    if self.request.retries < 2:
        raise KeyError("again")
    return self.request.retries


@app.task(bind=True)
async def async_reject(self):
    await asyncio.sleep(0)
    raise Reject("no thanks", requeue=False)


@app.task(bind=True)
async def async_ignore(self):
    await asyncio.sleep(0)
    raise Ignore()


@app.task
async def async_sleep(seconds):
    await asyncio.sleep(seconds)
    return seconds


@app.task
def sync_sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
async def async_soft_limited(seconds):
    await asyncio.sleep(seconds)
    return "finished"


@app.task
def sync_soft_limited(seconds):
    time.sleep(seconds)
    return "finished"


@app.task
async def async_handles_soft_limit(seconds):
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError as exc:
        return f"handled: {exc.args[0] if exc.args else ''}"
    return "finished"


@app.task
def sync_handles_soft_limit(seconds):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "handled"
    return "finished"


@app.task
async def child_pid():
    await asyncio.sleep(0)
    return os.getpid()


@app.task
def sync_child_pid():
    return os.getpid()


@app.task
async def allocate_mb(mb):
    """Hold on to ``mb`` MiB in this child, to trip max_memory_per_child."""
    _hoard.append(bytearray(mb * 1024 * 1024))
    await asyncio.sleep(0)
    return os.getpid()


_hoard = []


@app.task
async def same_select_three_times(n):
    """The same parameterised SELECT three times in one session: a prepared statement's reuse."""
    async with session() as s:
        return [(await s.execute(text("SELECT CAST(:n AS int) + 1"), {"n": n})).scalar_one()
                for _ in range(3)]
