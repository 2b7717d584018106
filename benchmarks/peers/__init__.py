"""The async-native queues users leave Celery for, on the benchmark's ``noop`` and ``io`` workloads.

Each has an app module here that a worker process of its own CLI imports:
``taskiq_app`` (taskiq with taskiq-redis's stream broker, which acknowledges
messages, and its Redis result backend) and ``dramatiq_app`` (dramatiq's Redis
broker with its ``AsyncIO`` middleware and Redis results). Both store every
result, as the Celery workers they are compared with do, and both build one
pooled async engine per worker process, of the size ``-P asyncsql`` gives
each child at ``-c 100`` (``POOL_SIZE``). ``python -m benchmarks.peers`` runs
them side by side with ``-P asyncsql -c 100`` on the project's transport.
"""

from __future__ import annotations

import os

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from ..settings import ASYNC_URL

BROKER_URL = os.environ.get("BENCH_PEER_BROKER", "redis://127.0.0.1:6379/6")
BACKEND_URL = os.environ.get("BENCH_PEER_BACKEND", "redis://127.0.0.1:6379/8")
PROCESSES, SLOTS = 2, 50  # per process: the same 100 tasks in flight as -c 100
POOL_SIZE = 40  # -P asyncsql's default engine pool per child at -c 100 (2 children)

_sessions: async_sessionmaker[AsyncSession] | None = None


def session() -> AsyncSession:
    """A session on this process's engine, built on first use on the process's one loop."""
    global _sessions
    if _sessions is None:
        engine = create_async_engine(ASYNC_URL, pool_size=POOL_SIZE, max_overflow=0)
        _sessions = async_sessionmaker(engine, expire_on_commit=False)
    return _sessions()
