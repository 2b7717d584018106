"""Tasks for Celery's own I/O off the child's loop: result states, chords, awaitable publishing."""

import asyncio
import os

import redis
from celery import chain, group

from celery_asyncpool import AsyncTask, aapply_async

from .app import app


@app.task(base=AsyncTask)
async def add(x, y):
    return x + y


@app.task(base=AsyncTask)
async def total(values):
    return sum(values)


@app.task(base=AsyncTask)
async def fail(message):
    raise ValueError(message)


@app.task(base=AsyncTask)
async def echo(value):
    return value


@app.task(base=AsyncTask, bind=True, max_retries=3)
async def retry_twice(self):
    if self.request.retries < 2:
        await self.aretry(countdown=0)
    return self.request.retries


@app.task(base=AsyncTask, bind=True, max_retries=1)
async def retry_forever(self):
    await self.aretry(exc=KeyError("gave up"), countdown=0)


@app.task(base=AsyncTask, bind=True)
async def send_children(self, count, link=False):
    """Send ``count`` adds with ``adelay`` (or ``aapply_async`` with a link); their ids."""
    sent = []
    for i in range(count):
        if link:
            sent.append(await add.aapply_async((i, i), link=echo.s()))
        else:
            sent.append(await add.adelay(i, i))
    return [r.id for r in sent]


@app.task(base=AsyncTask)
async def send_canvas():
    """A chain and a group, sent from a coroutine: their result ids."""
    chained = await aapply_async(chain(add.s(1, 2), add.s(3), add.s(4)))
    grouped = await aapply_async(group(add.s(i, 1) for i in range(3)))
    return [chained.id, grouped.id]


@app.task(base=AsyncTask)
async def noted_then_return(key, value):
    """Mark ``key`` in Redis once the body is done, then return: the store follows."""
    redis.Redis.from_url(os.environ["ITEST_MARKS"]).set(key, "done")
    await asyncio.sleep(0)
    return value


@app.task(base=AsyncTask)
async def sized(size):
    return "x" * size


@app.task
def sync_sized(size):
    return "x" * size
