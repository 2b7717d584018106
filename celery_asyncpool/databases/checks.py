"""What ``celery asyncsql check`` verifies: settings, budget, each database as a child sees it."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

from ..config import DatabaseSettings, Settings, masked_values, new_event_loop
from ..errors import ConfigurationError
from .budget import RESULT_BACKEND, Entry, connection_budget, over_max_connections, server_of
from .engines import Databases, Sizing, check_engine_options, connections_per_process, \
    engine_options


def run_check(app: Any, slots: int, *, echo: Callable[[str], Any]) -> list[str]:
    """Print the resolved settings and budget, connect to each database; return the problems."""
    try:
        settings = Settings.from_conf(app.conf)
    except ConfigurationError as exc:
        return [str(exc)]
    processes, slots_per_child = settings.layout(slots)
    sizing = Sizing(slots_per_child, processes, settings.connection_cap)
    try:
        check_engine_options(settings, sizing)
    except ConfigurationError as exc:
        return [str(exc)]
    echo(f"processes: {processes}, task slots per process: {slots_per_child}")
    if not settings.databases:
        return ["No database is configured: set asyncsql_database_url "
                "(or asyncsql_databases) in the Celery config."]
    for database in settings.databases:
        options = engine_options(database, sizing)
        per_child = connections_per_process(database, sizing)
        echo(f"database {database.name!r}: {database.masked_url}")
        echo(f"  engine options: {masked_values(options)!r}")
        echo(f"  connections: {per_child} per process, {per_child * processes} in all")
    budget = connection_budget(app.conf, settings, sizing)
    for entry in budget:
        if entry.name == RESULT_BACKEND:
            echo(f"result backend: {entry.masked_url}")
            echo(f"  connections: {entry.connections} in all (children and parent)")
    echo(f"connection budget: {sum(entry.connections for entry in budget)}")
    return _probe(settings, sizing, budget, echo)


STARTUP_PROBE_TIMEOUT_S = 5.0


def startup_warnings(settings: Settings, sizing: Sizing,
                     budget: tuple[Entry, ...]) -> list[str]:
    """What a worker should warn about at start-up: a database it cannot reach, or a
    connection budget above a server's ``max_connections``.

    Runs before any child is forked, on a loop thread that is gone when it
    returns; each database gets at most ``STARTUP_PROBE_TIMEOUT_S``.
    """
    return _probe(settings, sizing, budget, lambda _: None, timeout_s=STARTUP_PROBE_TIMEOUT_S)


def _probe(settings: Settings, sizing: Sizing, budget: tuple[Entry, ...],
           echo: Callable[[str], Any], timeout_s: float | None = None) -> list[str]:
    """Connect to each of our databases; its server's ``max_connections`` bounds the budget
    of every database on that server, the result backend's too.

    On a loop of its own, on a thread of its own: the caller may be running a loop.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncsql-check") as thread:
        return thread.submit(_probe_on_new_loop, settings, sizing, budget, echo,
                             timeout_s).result()


def _probe_on_new_loop(settings: Settings, sizing: Sizing, budget: tuple[Entry, ...],
                       echo: Callable[[str], Any], timeout_s: float | None) -> list[str]:
    loop = new_event_loop(settings.loop)
    try:
        return loop.run_until_complete(_probe_all(settings, sizing, budget, echo, timeout_s))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _probe_all(settings: Settings, sizing: Sizing, budget: tuple[Entry, ...],
                     echo: Callable[[str], Any], timeout_s: float | None) -> list[str]:
    try:
        databases = Databases(settings, sizing)
    except Exception as exc:
        return [f"Building the engines failed: {exc}"]
    problems: list[str] = []
    limits: dict[str, int] = {}
    try:
        for database in settings.databases:
            probe = _probe_one(databases, database, echo)
            reached = await _within(probe, timeout_s, database.name)
            if isinstance(reached, int):
                limits[server_of(database.url)] = reached
            elif isinstance(reached, str):
                problems.append(reached)
    finally:
        await databases.aclose()
    return problems + over_max_connections(budget, limits)


async def _within(probe: Any, timeout_s: float | None, name: str) -> int | str | None:
    try:
        result: int | str | None = await asyncio.wait_for(probe, timeout_s)
        return result
    except asyncio.TimeoutError:
        return f"Database {name!r} did not answer within {timeout_s}s."


async def _probe_one(databases: Databases, database: DatabaseSettings,
                     echo: Callable[[str], Any]) -> int | str | None:
    """The server's ``max_connections`` (None where unknown), or what is wrong with it."""
    from sqlalchemy import text

    name = database.name
    built = databases.engine(name)
    try:
        async with built.connect() as connection:
            await connection.execute(text("SELECT 1"))
            limit = pooled = None
            if built.dialect.name == "postgresql":
                limit = int((await connection.execute(text("SHOW max_connections"))).scalar_one())
                pooled = await _pooler_in_front(connection)
    except Exception as exc:
        return (f"Database {name!r} ({database.masked_url}) "
                f"cannot be reached: {type(exc).__name__}: {exc}")
    if pooled and not database.pgbouncer:
        return (f"Database {name!r} ({database.masked_url}) is reached through a connection "
                "pooler (PgBouncer or the like): the backend the driver was told of at "
                "connect is not the one that answers. In transaction mode asyncpg's prepared "
                "statements fail there; set asyncsql_pgbouncer = True (or 'pgbouncer': True "
                "in its asyncsql_databases entry). See docs/pgbouncer.md.")
    echo(f"database {name!r}: connected" + (f", server max_connections = {limit}" if limit else "")
         + (", through a pooler (engines set up for it)" if pooled else ""))
    return limit


async def _pooler_in_front(connection: Any) -> bool:
    """Whether a pooler stands between the driver and the server, idle or not.

    A pooler answers the connect itself, with a backend pid of its own making;
    ``pg_backend_pid()`` is the server's.
    """
    from sqlalchemy import text

    driver = (await connection.get_raw_connection()).driver_connection
    told = (driver.get_server_pid() if hasattr(driver, "get_server_pid")  # asyncpg
            else driver.info.backend_pid)  # psycopg
    actual = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    return bool(told != actual)
