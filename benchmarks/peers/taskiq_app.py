"""taskiq: a stream broker that acknowledges each message on receipt, results in Redis.

``--ack-type when_received`` is the nearest to Celery's default (acknowledge
when the task starts).
"""

from __future__ import annotations

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from .. import workloads
from . import BACKEND_URL, BROKER_URL, session

broker = RedisStreamBroker(BROKER_URL, queue_name="bench").with_result_backend(
    RedisAsyncResultBackend(BACKEND_URL))


@broker.task(task_name="bench.noop")
async def noop() -> None:
    return None


@broker.task(task_name="bench.io")
async def io() -> None:
    async with session() as s:
        await workloads.io(s)


TASKS = {"noop": noop, "io": io}
