"""What ``celery asyncsql check`` verifies: settings, budget, each database as a child sees it."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any

from ..config import DatabaseSettings, Settings, masked_values, new_event_loop
from ..errors import ConfigurationError
from . import fleet
from .budget import RESULT_BACKEND, Entry, ServerLimit, by_server, connection_budget, \
    over_max_connections, server_of
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
    problems, limits = _probe(settings, sizing, budget, echo)
    return problems + fleet_problems(app, settings, budget, limits, echo)


def fleet_problems(app: Any, settings: Settings, budget: tuple[Entry, ...],
                   limits: dict[str, ServerLimit], echo: Callable[[str], Any], *,
                   own_name: str = "this check's worker", node: str | None = None,
                   connection: Any = None,
                   timeout_s: float = fleet.INSPECT_TIMEOUT_S) -> list[str]:
    """The budgets the app's running workers advertise, added to this one per server:
    a problem for each server they would overfill (``fleet.over_limits``).

    ``node`` is left out of the replies (a worker's own); ``connection`` is the broker
    connection to ask on (the app's pool where None).
    """
    try:
        peers = fleet.advertised(app, own_node=node, timeout_s=timeout_s, connection=connection)
    except Exception as exc:  # the worker alone is still judged
        echo(f"fleet: the app's workers could not be asked ({type(exc).__name__}: {exc})")
        return []
    own = by_server(budget)
    judged = dict(limits)
    for server, total in fleet.totals(own, peers).items():
        echo(f"fleet: {total} connections to {server} with the "
             f"{len(fleet.sharing(peers, server))} running asyncsql worker(s) that use it")
        limit = limits.get(server)
        if limit is None or not limit.pooled:
            continue
        urls = [database.url for database in settings.databases
                if server_of(database.url) == server]
        most = pgbouncer_max_client_conn(urls[0]) if urls else None
        if most is None:
            echo(f"  through a pooler whose settings cannot be read here: compare {total} "
                 "with PgBouncer's max_client_conn; the server sees at most its pool sizes")
        else:
            echo(f"  through PgBouncer: max_client_conn = {most}")
            judged[server] = ServerLimit(most, 0, pgbouncer=True)
    return fleet.over_limits(own_name, own, peers, judged)


def pgbouncer_max_client_conn(url: str) -> int | None:
    """PgBouncer's ``max_client_conn``, read on its admin console (``SHOW CONFIG``) as the
    database's user; None where psycopg is not installed or the user may not read it
    (PgBouncer's ``admin_users`` or ``stats_users``). The console speaks the simple query
    protocol alone: psycopg's ``ClientCursor`` does."""
    from sqlalchemy.engine import make_url

    try:
        import psycopg
    except ImportError:
        return None
    parsed = make_url(url)
    try:
        with psycopg.connect(host=parsed.host, port=parsed.port or 5432, user=parsed.username,
                             password=parsed.password, dbname="pgbouncer", autocommit=True,
                             connect_timeout=5, cursor_factory=psycopg.ClientCursor) as conn:
            rows = conn.execute("SHOW CONFIG").fetchall()
    except Exception:
        return None
    found = [row[1] for row in rows if row[0] == "max_client_conn"]
    return int(found[0]) if found else None


STARTUP_PROBE_TIMEOUT_S = 5.0


Probed = tuple[list[str], dict[str, ServerLimit]]  # the problems, each server's limits


def startup_probe(settings: Settings, sizing: Sizing, budget: tuple[Entry, ...]) -> Probed:
    """What a worker should warn about at start-up (a database it cannot reach, a
    connection budget above a server's ``max_connections``), and each server's limits,
    which the fleet's budgets are judged against once the consumer is connected.

    Runs before any child is forked, on a loop thread that is gone when it
    returns; each database gets at most ``STARTUP_PROBE_TIMEOUT_S``.
    """
    return _probe(settings, sizing, budget, lambda _: None, timeout_s=STARTUP_PROBE_TIMEOUT_S)


def _probe(settings: Settings, sizing: Sizing, budget: tuple[Entry, ...],
           echo: Callable[[str], Any], timeout_s: float | None = None) -> Probed:
    """Connect to each of our databases; its server's ``max_connections`` bounds the budget
    of every database on that server, the result backend's too.

    On a loop of its own, on a thread of its own: the caller may be running a loop.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncsql-check") as thread:
        return thread.submit(_probe_on_new_loop, settings, sizing, budget, echo,
                             timeout_s).result()


def _probe_on_new_loop(settings: Settings, sizing: Sizing, budget: tuple[Entry, ...],
                       echo: Callable[[str], Any], timeout_s: float | None) -> Probed:
    loop = new_event_loop(settings.loop)
    try:
        return loop.run_until_complete(_probe_all(settings, sizing, budget, echo, timeout_s))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _probe_all(settings: Settings, sizing: Sizing, budget: tuple[Entry, ...],
                     echo: Callable[[str], Any], timeout_s: float | None) -> Probed:
    try:
        databases = Databases(settings, sizing)
    except Exception as exc:
        return [f"Building the engines failed: {exc}"], {}
    problems: list[str] = []
    limits: dict[str, ServerLimit] = {}
    try:
        for database in settings.databases:
            probe = _probe_one(databases, database, echo)
            reached = await _within(probe, timeout_s, database.name)
            if isinstance(reached, ServerLimit):
                limits[server_of(database.url)] = reached
            elif isinstance(reached, str):
                problems.append(reached)
    finally:
        await databases.aclose()
    maxima = {server: limit.max_connections for server, limit in limits.items()}
    return problems + over_max_connections(budget, maxima), limits


async def _within(probe: Any, timeout_s: float | None, name: str) -> ServerLimit | str | None:
    try:
        result: ServerLimit | str | None = await asyncio.wait_for(probe, timeout_s)
        return result
    except asyncio.TimeoutError:
        return f"Database {name!r} did not answer within {timeout_s}s."


async def _probe_one(databases: Databases, database: DatabaseSettings,
                     echo: Callable[[str], Any]) -> ServerLimit | str | None:
    """The server's limits (None where unknown), or what is wrong with it."""
    from sqlalchemy import text

    name = database.name
    built = databases.engine(name)
    try:
        async with built.connect() as connection:
            await connection.execute(text("SELECT 1"))
            limit = pooled = None
            if built.dialect.name == "postgresql":
                pooled = await _pooler_in_front(connection)
                limit = await _server_limit(connection, pooled)
    except Exception as exc:
        return (f"Database {name!r} ({database.masked_url}) "
                f"cannot be reached: {type(exc).__name__}: {exc}")
    if pooled and not database.pgbouncer:
        return (f"Database {name!r} ({database.masked_url}) is reached through a connection "
                "pooler (PgBouncer or the like): the backend the driver was told of at "
                "connect is not the one that answers. In transaction mode asyncpg's prepared "
                "statements fail there; set asyncsql_pgbouncer = True (or 'pgbouncer': True "
                "in its asyncsql_databases entry). See docs/pgbouncer.md.")
    echo(f"database {name!r}: connected"
         + (f", server max_connections = {limit.max_connections}" if limit else "")
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


async def _server_limit(connection: Any, pooled: bool) -> ServerLimit:
    """``max_connections`` and the slots kept for superusers (``reserved_connections``
    only exists from PostgreSQL 16; ``current_setting(..., true)`` is NULL before)."""
    from sqlalchemy import text

    row = (await connection.execute(text(
        "SELECT current_setting('max_connections')::int, "
        "current_setting('superuser_reserved_connections')::int "
        "+ coalesce(current_setting('reserved_connections', true), '0')::int"))).one()
    return ServerLimit(int(row[0]), int(row[1]), pooled)
