"""Where the benchmark's services are, read from the environment by the runner and every worker."""

from __future__ import annotations

import os

DATABASE = os.environ.get("BENCH_DATABASE", "postgres@127.0.0.1:5432/asyncsql_bench")
ASYNC_URL = f"postgresql+asyncpg://{DATABASE}"
SYNC_URL = f"postgresql+psycopg://{DATABASE}"
BROKER_URL = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/11")
BACKEND_URL = os.environ.get("BENCH_BACKEND", "redis://127.0.0.1:6379/12")
USERS = 10_000
# RabbitMQ, the broker of the runs that put only the result backend a round trip away.
AMQP_URL = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
# "0" keeps Celery's synchronous result store on the child's loop: the control.
RESULTS_OFF_LOOP = os.environ.get("BENCH_RESULTS_OFF_LOOP", "1") != "0"
PROCESSES = int(os.environ.get("BENCH_PROCESSES", "2"))
# "celery_asyncpool.broker:Transport" runs the worker on the package's Redis broker transport.
BROKER_TRANSPORT = os.environ.get("BENCH_BROKER_TRANSPORT") or None
