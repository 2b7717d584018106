"""dramatiq: its Redis broker, ``AsyncIO`` middleware (async actors on a loop per process), results in Redis."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware.asyncio import AsyncIO
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from .. import workloads
from . import BACKEND_URL, BROKER_URL, session

broker = RedisBroker(url=BROKER_URL)
broker.add_middleware(AsyncIO())
broker.add_middleware(Results(backend=RedisBackend(url=BACKEND_URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench.noop", queue_name="bench", store_results=True)
async def noop() -> None:
    return None


@dramatiq.actor(actor_name="bench.io", queue_name="bench", store_results=True)
async def io() -> None:
    async with session() as s:
        await workloads.io(s)


TASKS = {"noop": noop, "io": io}
