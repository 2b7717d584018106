"""Tasks for test_lifecycle.py: countable side effects, memory, fork evidence, a user's own engine.

Every SQLAlchemy pool closing a connection logs ``lifecycle-pool-close pid=<pid>``,
so a test can tell engines disposed by their child from connections the OS
dropped when the process died.

With ``ITEST_PARENT_ENGINE=1`` (set only for the worker of the row 23 test),
the worker's main process uses ``user_engine`` at import from a loop of its
own, before any child is forked, keeps that pooled connection, and uses it
again at ``worker_shutdown``, writing what it saw to ``ITEST_PARENT_PROBE_FILE``.
"""

import asyncio
import json
import logging
import os
import re
import threading
import time

import psycopg
from celery import signals
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import Pool

from celery_asyncpool import session

from .app import APP_NAME, DATABASE_URL, app

logger = logging.getLogger(__name__)

IMPORT_PID = os.getpid()
PG_DSN = "postgresql://postgres@127.0.0.1:5432/test"
_TABLE = re.compile(r"^lifecycle_[0-9a-f]{8,32}$")


def _table(name):
    if not _TABLE.match(name):
        raise ValueError(f"not a test table: {name!r}")
    return name


@event.listens_for(Pool, "close")
def _log_pool_close(dbapi_connection, connection_record):
    logger.info("lifecycle-pool-close pid=%s", os.getpid())


# --- row 14: a side effect per run, to count -------------------------------------------------

@app.task
async def record(table, token, delay_s=0.0):
    """Insert one row naming this run; return the child's pid."""
    async with session() as s:
        await s.execute(text(f"INSERT INTO {_table(table)} (token, pid) VALUES (:token, :pid)"),
                        {"token": token, "pid": os.getpid()})
        await s.commit()
    await asyncio.sleep(delay_s)
    return os.getpid()


@app.task
def sync_record(table, token, delay_s=0.0):
    """``record`` for stock prefork."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {_table(table)} (token, pid) VALUES (%s, %s)",
                     (token, os.getpid()))
    time.sleep(delay_s)
    return os.getpid()


# --- row 15: memory ---------------------------------------------------------------------------

_hoard = []


@app.task
def sync_allocate_mb(mb):
    """``tasks.allocate_mb`` for stock prefork."""
    _hoard.append(bytearray(mb * 1024 * 1024))
    return os.getpid()


# --- row 19: tasks in flight holding a database connection -------------------------------------

@app.task
async def db_sleep(seconds):
    """Open this child's connection, then sleep; return what ran where."""
    async with session() as s:
        backend = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    started = time.time()
    await asyncio.sleep(seconds)
    return {"backend": backend, "child": os.getpid(), "started": started,
            "finished": time.time()}


@app.task
def sync_timed_sleep(seconds):
    started = time.time()
    time.sleep(seconds)
    return {"child": os.getpid(), "started": started, "finished": time.time()}


# --- row 20: worker_soft_shutdown_timeout, the same sleepers with acks_late ------------------

@app.task(acks_late=True)
async def db_sleep_late(seconds):
    """``db_sleep``, acked only once done: a cancelled run goes back to the queue."""
    return await db_sleep.run(seconds)


@app.task(acks_late=True)
def sync_timed_sleep_late(seconds):
    """``db_sleep_late`` for stock prefork."""
    return sync_timed_sleep.run(seconds)


# --- row 22: fork or spawn evidence -------------------------------------------------------

@app.task
async def fork_evidence():
    await asyncio.sleep(0)
    return {"import_pid": IMPORT_PID, "pid": os.getpid(), "ppid": os.getppid(),
            "thread": threading.current_thread().name,
            "fresh_interpreter": os.environ.get("FORKED_BY_MULTIPROCESSING") == "1"}


# --- row 23: the user's own engine, built at import, before fork -------------------------------

user_engine = create_async_engine(
    DATABASE_URL,
    connect_args={"server_settings": {"application_name": f"{APP_NAME}-user"}},
)
PARENT = {}


async def _backend_pid(hold_s=0.0):
    async with user_engine.connect() as conn:
        backend = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await asyncio.sleep(hold_s)
    return backend


@app.task
async def user_engine_probe(hold_s=0.0):
    """Use the module-level engine as a user's task would, unchanged; keep the connection
    ``hold_s`` seconds, so tasks in flight together each need one."""
    backend = await _backend_pid(hold_s)
    return {"backend": backend, "child": os.getpid(), "pool": id(user_engine.pool),
            "parent_pool": PARENT.get("pool"), "parent_backend": PARENT.get("backend"),
            "import_pid": IMPORT_PID}


def _start_parent_engine():
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="parent-loop", daemon=True).start()
    PARENT["loop"] = loop
    PARENT["backend"] = asyncio.run_coroutine_threadsafe(_backend_pid(), loop).result(30)
    PARENT["pool"] = id(user_engine.pool)


@signals.worker_shutdown.connect
def _parent_probe_again(**_):
    if "loop" not in PARENT or os.getpid() != IMPORT_PID:
        return
    seen = {"backend_before": PARENT["backend"]}
    try:
        seen["backend_after"] = asyncio.run_coroutine_threadsafe(
            _backend_pid(), PARENT["loop"]).result(30)
    except Exception as exc:  # reported to the test, which fails on it
        seen["error"] = repr(exc)
    with open(os.environ["ITEST_PARENT_PROBE_FILE"], "w") as out:
        json.dump(seen, out)


if os.environ.get("ITEST_PARENT_ENGINE") == "1":
    _start_parent_engine()
