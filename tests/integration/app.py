"""The Celery app that integration-test workers run, configured from the environment.

The test process imports it too, to publish. ``ITEST_QUEUE`` gives each worker
its own queue and ``ITEST_APP_NAME`` its own PostgreSQL application_name, so
tests can count exactly that worker's connections.
"""

import json
import os

from celery import Celery

import celery_asyncpool  # noqa: F401  registers the pool for app.Worker and config

BROKER_URL = os.environ.get("ITEST_BROKER", "redis://127.0.0.1:6379/14")
BACKEND_URL = os.environ.get("ITEST_BACKEND", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("ITEST_DATABASE_URL",
                              "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
APP_NAME = os.environ.get("ITEST_APP_NAME", "itest")

app = Celery(
    "itest",
    broker=BROKER_URL,
    backend=BACKEND_URL,
    include=os.environ.get("ITEST_INCLUDE", "tests.integration.tasks").split(","),
)
app.conf.update(
    task_default_queue=os.environ.get("ITEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    result_extended=True,
    asyncsql_database_url=DATABASE_URL,
    asyncsql_engine_options={"connect_args": {"server_settings": {"application_name": APP_NAME}}},
    # The tests' workers share a broker but are no fleet: none asks the others at start-up
    # (tests/fleet turns it on, on brokers of their own).
    asyncsql_fleet_check_s=None,
)
app.conf.update(json.loads(os.environ.get("ITEST_CONF", "{}")))


@app.task
async def app_module_pid():
    """A task in the ``-A`` module itself, which a spawned child has to import too."""
    return os.getpid()
