"""Row 24 of DESIGN.md: eager mode and ``task.apply()`` run async bodies, in this process.

No worker here: the apps below live in the test process, against the real PostgreSQL.
"""

import asyncio
import logging
import threading
import uuid

import psycopg
import pytest
from celery import Celery, current_task
from sqlalchemy import text

from celery_asyncpool import AsyncTask, session

from .conftest import PG_DSN

DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
APP_NAME = f"itest-eager-{uuid.uuid4().hex[:8]}"
SETTINGS = {
    "task_always_eager": True,
    "task_eager_propagates": True,
    "asyncsql_database_url": DATABASE_URL,
    "asyncsql_engine_options": {
        "connect_args": {"server_settings": {"application_name": APP_NAME}}},
}

# Every task of this app is an AsyncTask.
eager_app = Celery("itest-eager", broker="memory://", task_cls="celery_asyncpool:AsyncTask")
eager_app.conf.update(SETTINGS)

# A stock app: AsyncTask only where a task asks for it with base=.
plain_app = Celery("itest-eager-plain", broker="memory://")
plain_app.conf.update(SETTINGS)


@eager_app.task
async def add(x, y):
    await asyncio.sleep(0.01)
    return x + y


@eager_app.task(bind=True)
async def whoami(self):
    before = (self.request.id, current_task.request.id)
    await asyncio.sleep(0.01)
    after = (self.request.id, current_task.request.id)
    return {"before": before, "after": after, "is_eager": self.request.is_eager,
            "thread": threading.current_thread().name}


@eager_app.task
async def insert_and_count(table, token):
    async with session() as s:
        backend = (await s.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await s.execute(text(f"INSERT INTO {table} (token) VALUES (:token)"), {"token": token})
        await s.commit()
        count = (await s.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
    return {"count": count, "backend": backend}


@eager_app.task
async def fails():
    await asyncio.sleep(0)
    raise ValueError("from the coroutine")


@plain_app.task(base=AsyncTask)
async def based_multiply(x, y):
    async with session() as s:
        return (await s.execute(text("SELECT CAST(:x AS integer) * CAST(:y AS integer)"), {"x": x, "y": y})).scalar_one()


@plain_app.task(base=AsyncTask, bind=True)
async def based_whoami(self):
    await asyncio.sleep(0)
    return self.request.id


@plain_app.task
async def unbased():
    return "never run"


@pytest.fixture
def table():
    name = f"eager_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (token text NOT NULL)")
    yield name
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def committed_tokens(table):
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        return [row[0] for row in conn.execute(f"SELECT token FROM {table} ORDER BY token")]


def test_always_eager_delay_and_apply_return_the_real_value():
    result = add.delay(2, 3)
    assert result.state == "SUCCESS"
    assert result.get() == 5
    applied = add.apply(args=(4, 5))
    assert applied.successful()
    assert applied.get() == 9
    assert add.apply_async(args=(1, 1)).get() == 2


def test_apply_without_always_eager_runs_the_body():
    with_flag = eager_app.conf.task_always_eager
    eager_app.conf.task_always_eager = False
    try:
        assert add.apply(args=(10, 11)).get() == 21
    finally:
        eager_app.conf.task_always_eager = with_flag


def test_eager_request_identity_across_awaits():
    result = whoami.apply()
    seen = result.get()
    assert seen["before"] == (result.id, result.id)
    assert seen["after"] == (result.id, result.id)
    assert seen["is_eager"] is True
    assert seen["thread"] == "asyncsql-eager"


def test_eager_exception_propagates_and_is_stored_on_apply():
    with pytest.raises(ValueError, match="from the coroutine"):
        fails.delay()
    eager_app.conf.task_eager_propagates = False
    try:
        result = fails.apply()
    finally:
        eager_app.conf.task_eager_propagates = True
    assert result.state == "FAILURE"
    assert isinstance(result.result, ValueError)


def test_eager_session_does_real_sql(table):
    tokens = sorted(uuid.uuid4().hex for _ in range(3))
    seen = [insert_and_count.delay(table, token).get() for token in tokens]
    assert [item["count"] for item in seen] == [1, 2, 3]
    assert committed_tokens(table) == tokens
    # One engine on one helper loop: its pooled connection is reused.
    assert len({item["backend"] for item in seen}) == 1
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        app_name = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                                (seen[0]["backend"],)).fetchone()[0]
    assert app_name == APP_NAME


def test_eager_inside_a_running_event_loop(table):
    token = uuid.uuid4().hex

    async def caller():
        loop = asyncio.get_running_loop()
        value = add.delay(7, 8).get()
        applied = add.apply(args=(1, 2)).get()
        row = insert_and_count.apply(args=(table, token)).get()
        return value, applied, row, loop is asyncio.get_running_loop()

    value, applied, row, same_loop = asyncio.run(caller())
    assert (value, applied, same_loop) == (15, 3, True)
    assert row["count"] == 1
    assert committed_tokens(table) == [token]


def test_base_async_task_on_a_stock_app():
    assert based_multiply.delay(6, 7).get() == 42
    assert based_multiply.apply(args=(3, 3)).get() == 9
    result = based_whoami.apply()
    assert result.get() == result.id


def test_eager_request_identity_of_a_task_registered_after_the_first_eager_call():
    assert add.delay(1, 2).get() == 3  # the helper loop exists from here on

    async def late(self):
        await asyncio.sleep(0)
        return self.request.id

    late_task = eager_app.task(name=f"late_{uuid.uuid4().hex}", bind=True)(late)
    result = late_task.apply()
    assert result.get() == result.id


def test_async_task_without_the_base_logs_what_to_do(caplog):
    with caplog.at_level(logging.ERROR, logger="celery_asyncpool"):
        result = unbased.delay()
    coroutine = result.get()
    assert asyncio.iscoroutine(coroutine), "stock Celery hands back the coroutine"
    coroutine.close()
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR and r.name.startswith("celery_asyncpool")]
    assert len(errors) == 1, errors
    assert unbased.name in errors[0]
    assert "base=celery_asyncpool.AsyncTask" in errors[0]
    assert "-P asyncsql" in errors[0]
