"""Engine sizing: pool_size follows task slots within the connection cap."""

from sqlalchemy.pool import NullPool, StaticPool

from celery_asyncpool.config import DatabaseSettings
from celery_asyncpool.databases.engines import Sizing, connections_per_process, engine_options

PG = "postgresql+asyncpg://postgres@127.0.0.1/test"


def db(url=PG, **engine):
    return DatabaseSettings("default", url, engine, {})


def test_queue_pool_gets_slots_and_no_overflow():
    options = engine_options(db(pool_pre_ping=True), Sizing(slots=1, processes=2, connection_cap=80))
    assert options == {"pool_pre_ping": True, "pool_size": 1, "max_overflow": 0}
    assert connections_per_process(db(), Sizing(1, 2, 80)) == 1


def test_pool_size_is_lowered_to_stay_within_the_cap():
    options = engine_options(db(), Sizing(slots=50, processes=2, connection_cap=80))
    assert options["pool_size"] == 40


def test_the_users_explicit_values_win():
    options = engine_options(db(pool_size=7), Sizing(1, 2, 80))
    assert options == {"pool_size": 7, "max_overflow": 0}


def test_nullpool_and_staticpool_take_no_pool_size():
    assert engine_options(db(poolclass=NullPool), Sizing(3, 2, 80)) == {"poolclass": NullPool}
    assert connections_per_process(db(poolclass=NullPool), Sizing(3, 2, 80)) == 3
    assert engine_options(db(poolclass=StaticPool), Sizing(3, 2, 80)) == {"poolclass": StaticPool}
    assert connections_per_process(db(poolclass=StaticPool), Sizing(3, 2, 80)) == 1


def test_sqlite_memory_database_keeps_its_static_pool():
    memory = db("sqlite+aiosqlite://")
    assert engine_options(memory, Sizing(2, 2, 80)) == {}


def test_eager_sizing_leaves_sqlalchemy_defaults():
    assert engine_options(db(), Sizing(None, 1, 80)) == {}


def test_options_sqlalchemy_rejects_fail_naming_the_database():
    import pytest

    from celery_asyncpool.config import Settings
    from celery_asyncpool.databases.engines import check_engine_options
    from celery_asyncpool.errors import ConfigurationError

    settings = Settings.from_conf({"asyncsql_database_url": PG,
                                   "asyncsql_engine_options": {"pool_sise": 3}})
    with pytest.raises(ConfigurationError, match=r"database 'default' .*rejected by "
                                                 r"create_async_engine: TypeError.*pool_sise"):
        check_engine_options(settings, Sizing(1, 2, 80))


def test_behind_pgbouncer_nothing_is_prepared_server_side_and_the_users_args_win():
    def pooled(url, **engine):
        return DatabaseSettings("default", url, engine, {}, pgbouncer=True)

    options = engine_options(pooled(PG, connect_args={"timeout": 5}), Sizing(4, 2, 80))
    args = options["connect_args"]
    assert (args["statement_cache_size"], args["prepared_statement_cache_size"]) == (0, 0)
    assert args["prepared_statement_name_func"]() == "" and args["timeout"] == 5
    psycopg = engine_options(pooled("postgresql+psycopg://postgres@127.0.0.1/test"),
                             Sizing(4, 2, 80))
    assert psycopg["connect_args"] == {"prepare_threshold": None}
    mine = engine_options(pooled(PG, connect_args={"statement_cache_size": 10}), Sizing(4, 2, 80))
    assert mine["connect_args"]["statement_cache_size"] == 10
    assert "connect_args" not in engine_options(db(), Sizing(4, 2, 80))


def test_connections_carry_the_workers_name_unless_the_user_named_them():
    def named(url, **engine):
        return engine_options(db(url, **engine), Sizing(4, 2, 80), "w1@host")["connect_args"]

    assert named(PG) == {"server_settings": {"application_name": "w1@host asyncsql default"}}
    assert named(PG, connect_args={"server_settings": {"application_name": "web", "jit": "off"}}
                 ) == {"server_settings": {"application_name": "web", "jit": "off"}}
    assert named(PG + "?application_name=mine") == {}
    assert named("postgresql+psycopg://postgres@127.0.0.1/test") == {
        "application_name": "w1@host asyncsql default"}
    assert named("sqlite+aiosqlite:///x.db") == {}
    long = engine_options(db(), Sizing(4, 2, 80), "é" * 40)["connect_args"]
    assert len(long["server_settings"]["application_name"].encode()) <= 63  # the server's cut


def test_a_queue_pool_counts_the_tasks_waiting_for_a_connection_across_dispose(tmp_path):
    """``waiters`` (the metrics' ``asyncsql_engine_waiters``): three tasks on a pool of one
    connection, two waiting; the pool ``dispose()`` makes in its place counts too."""
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import AsyncAdaptedQueuePool

    from celery_asyncpool.databases.engines import waiter_counting

    async def main() -> list[int]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}", pool_size=1,
                                     max_overflow=0,
                                     poolclass=waiter_counting(AsyncAdaptedQueuePool))
        seen = []
        for _ in range(2):
            release = asyncio.Event()

            async def hold() -> None:
                async with engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
                    await release.wait()

            holders = [asyncio.create_task(hold()) for _ in range(3)]
            await asyncio.sleep(0.2)
            seen.append(engine.sync_engine.pool.waiters)
            release.set()
            await asyncio.gather(*holders)
            seen.append(engine.sync_engine.pool.waiters)
            await engine.dispose()
        assert isinstance(engine.sync_engine.pool, AsyncAdaptedQueuePool)
        return seen

    assert asyncio.run(main()) == [2, 0, 2, 0]
