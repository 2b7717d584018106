"""Where the benchmark's services are, read from the environment by the runner and every worker."""

from __future__ import annotations

import os

DATABASE = os.environ.get("BENCH_DATABASE", "postgres@127.0.0.1:5432/asyncsql_bench")
ASYNC_URL = f"postgresql+asyncpg://{DATABASE}"
SYNC_URL = f"postgresql+psycopg://{DATABASE}"
BROKER_URL = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/11")
BACKEND_URL = os.environ.get("BENCH_BACKEND", "redis://127.0.0.1:6379/12")
USERS = 10_000
