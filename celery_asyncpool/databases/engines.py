"""Engines and session factories, one set per event loop, built where they run.

An ``AsyncEngine``'s pool hands out connections bound to the loop that opened
them, so each loop builds its own engines from the settings and disposes them
on that loop: a worker child's and the eager-mode helper's loops through their
``Runtime``; any other loop (a web app's, a script's, a test's) through
``standalone``. They are kept by (process, loop), so an engine is never handed
to a loop, or a forked process, other than the one it was built in;
``session()`` and ``engine()`` (``api``) find them there.

SQLAlchemy is imported inside functions: the ``celery`` command imports this
package for every invocation (its ``celery.commands`` entry point).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import DatabaseSettings, Settings
from ..errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

logger = logging.getLogger(__name__)

_by_loop: dict[tuple[int, asyncio.AbstractEventLoop], Databases] = {}


@dataclass(frozen=True)
class Sizing:
    """How many tasks one process runs at once, and how many such processes share a cap.

    ``slots=None`` leaves SQLAlchemy's own pool defaults alone (eager mode).
    """

    slots: int | None
    processes: int
    connection_cap: int


def engine_options(database: DatabaseSettings, sizing: Sizing,
                   worker: str | None = None) -> dict[str, Any]:
    """The ``create_async_engine`` options for one process, defaults filled in.

    Queue pools get ``pool_size`` = the process's task slots (lowered so all
    processes stay within the cap) and ``max_overflow`` = 0, each only where
    the user did not set it; other pool classes are left as configured. With
    ``worker`` (its node name), PostgreSQL connections are named after it and
    the database, unless the user named them.
    """
    options = dict(database.engine_options)
    if database.pgbouncer:
        options["connect_args"] = {**pooler_connect_args(database.url),
                                   **options.get("connect_args", {})}
    if worker is not None:
        options["connect_args"] = with_application_name(
            database.url, options.get("connect_args", {}), f"{worker} asyncsql {database.name}")
    if sizing.slots is not None and _is_queue_pool(_pool_class(database)):
        share = max(1, sizing.connection_cap // sizing.processes)
        options.setdefault("pool_size", max(1, min(sizing.slots, share)))
        options.setdefault("max_overflow", 0)
    return options


def pooler_connect_args(url: str) -> dict[str, Any]:
    """The driver's options for a transaction-mode pooler: nothing prepared server-side
    outlives its transaction.

    PgBouncer in transaction mode hands each transaction any server connection
    and runs no reset query, so a named statement prepared in one is missing in
    the next, or already taken, and unique names pile up on the server. asyncpg
    with its cache off sends unnamed statements, parsed again with each execute;
    SQLAlchemy's own cache off and an empty name keep it so. psycopg prepares
    nothing with ``prepare_threshold`` None.
    """
    from sqlalchemy.engine import make_url

    driver = make_url(url).get_driver_name()
    if driver == "asyncpg":
        return {"statement_cache_size": 0, "prepared_statement_cache_size": 0,
                "prepared_statement_name_func": unnamed_statement}
    if driver == "psycopg":
        return {"prepare_threshold": None}
    return {}


def with_application_name(url: str, connect_args: dict[str, Any], name: str) -> dict[str, Any]:
    """``connect_args`` with PostgreSQL's ``application_name`` set to ``name`` (cut to the
    server's 63 bytes), where neither they nor the URL set one: ``pg_stat_activity``
    then says which worker holds each connection."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    name = name.encode()[:63].decode(errors="ignore")
    if "application_name" in parsed.query or "application_name" in connect_args:
        return connect_args
    if parsed.get_driver_name() == "asyncpg":
        settings = dict(connect_args.get("server_settings") or {})
        settings.setdefault("application_name", name)
        return {**connect_args, "server_settings": settings}
    if parsed.get_backend_name() == "postgresql":
        return {**connect_args, "application_name": name}
    return connect_args


def notice_dead_host(seconds: int, dbapi_connection: Any, _record: Any) -> None:
    """Have the server drop this connection within ``seconds`` of its host going silent.

    A host that dies sends no FIN: the backend would wait on its socket for
    the kernel's keepalive (2 hours on Linux), holding a slot of
    ``max_connections`` and any locks. Keepalive probes after ``seconds / 2``
    idle, 4 unanswered ``seconds / 8`` apart, end an idle connection; a reply
    unacknowledged for ``seconds`` (``tcp_user_timeout``) ends a busy one.
    One statement, one round trip, per new connection.
    """
    idle, interval = max(1, seconds // 2), max(1, seconds // 8)
    settings = {"tcp_keepalives_idle": idle, "tcp_keepalives_interval": interval,
                "tcp_keepalives_count": 4, "tcp_user_timeout": seconds * 1000}
    cursor = dbapi_connection.cursor()
    cursor.execute("SELECT " + ", ".join(f"set_config('{name}', '{int(value)}', false)"
                                         for name, value in settings.items()))
    cursor.close()


def unnamed_statement() -> str:
    """PostgreSQL's unnamed statement: replaced by the next, never left on the server."""
    return ""


def check_engine_options(settings: Settings, sizing: Sizing) -> None:
    """Build each engine once, without connecting, so bad options fail at start-up.

    Raises:
        ConfigurationError: naming the database and what SQLAlchemy rejected.
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    for database in settings.databases:
        options = engine_options(database, sizing)
        try:
            built = create_async_engine(database.url, **options)
        except Exception as exc:
            raise ConfigurationError(
                f"The engine options of database {database.name!r} ({options!r}) were "
                f"rejected by create_async_engine: {type(exc).__name__}: {exc}") from None
        built.sync_engine.dispose(close=False)


def connections_per_process(database: DatabaseSettings, sizing: Sizing) -> int:
    """Most connections one process's engine for ``database`` may open at once."""
    from sqlalchemy.pool import NullPool

    options = engine_options(database, sizing)
    pool_class = _pool_class(database)
    if _is_queue_pool(pool_class):
        return int(options.get("pool_size", 5)) + max(0, int(options.get("max_overflow", 10)))
    if pool_class is None or issubclass(pool_class, NullPool):
        return sizing.slots or 1  # one connection per task running at once
    return 1


def _pool_class(database: DatabaseSettings) -> type | None:
    from sqlalchemy.engine import make_url

    if "pool" in database.engine_options:
        return None
    explicit = database.engine_options.get("poolclass")
    if explicit is not None:
        return explicit if isinstance(explicit, type) else None
    url = make_url(database.url)
    dialect: Any = url.get_dialect().get_async_dialect_cls(url)
    pool_class: type = dialect.get_pool_class(url)
    return pool_class


@functools.cache
def waiter_counting(pool_class: type) -> type:
    """``pool_class``, counting in ``waiters`` the callers inside its ``connect()``: those
    that wait for a connection to be checked in or opened. SQLAlchemy's pools keep no
    such count; a subclass (not a wrapped instance) survives ``dispose()``, which makes
    a new pool of the same class."""
    base_connect = getattr(pool_class, "connect")

    def connect(self: Any) -> Any:
        self.waiters += 1
        try:
            return base_connect(self)
        finally:
            self.waiters -= 1

    return type(pool_class.__name__, (pool_class,),
                {"waiters": 0, "connect": connect, "__module__": pool_class.__module__,
                 "__doc__": pool_class.__doc__})


def _is_queue_pool(pool_class: type | None) -> bool:
    from sqlalchemy.pool import QueuePool

    return pool_class is not None and issubclass(pool_class, QueuePool)


class Databases:
    """The engines and session factories of one event loop.

    Built on the loop that will use them; engines connect lazily, so building
    never waits on the database. ``aclose`` disposes them on the same loop.
    """

    def __init__(self, settings: Settings, sizing: Sizing, worker: str | None = None) -> None:
        from sqlalchemy import event
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        self.loop = asyncio.get_running_loop()
        self.key = (os.getpid(), self.loop)
        self.engines: dict[str, AsyncEngine] = {}
        self.sessionmakers: dict[str, async_sessionmaker[AsyncSession]] = {}
        self.settings = settings
        for database in settings.databases:
            options = engine_options(database, sizing, worker)
            pool_class = _pool_class(database)
            if "pool" not in options and _is_queue_pool(pool_class):
                options["poolclass"] = waiter_counting(pool_class)
            built = create_async_engine(database.url, **options)
            if settings.dead_host_timeout_s and not database.pgbouncer \
                    and built.dialect.name == "postgresql":
                event.listen(built.sync_engine, "connect",
                             functools.partial(notice_dead_host, settings.dead_host_timeout_s))
            self.engines[database.name] = built
            session_options = {"expire_on_commit": False, **database.session_options}
            self.sessionmakers[database.name] = async_sessionmaker(built, **session_options)
        _by_loop[self.key] = self

    @property
    def open(self) -> bool:
        """Whether these are still the loop's databases (``aclose`` not yet called)."""
        return _by_loop.get(self.key) is self

    async def aclose(self) -> None:
        """Dispose every engine, closing its pooled connections, on this loop."""
        if _by_loop.get(self.key) is self:
            del _by_loop[self.key]
        for name, built in self.engines.items():
            try:
                await built.dispose()
            except Exception:
                logger.exception("Disposing the engine of database %r failed", name)

    def engine(self, name: str) -> AsyncEngine:
        try:
            return self.engines[name]
        except KeyError:
            self.settings.database(name)  # raises, naming the configured databases
            raise

    def sessionmaker(self, name: str) -> async_sessionmaker[AsyncSession]:
        self.engine(name)
        return self.sessionmakers[name]


def registered() -> Databases | None:
    """The running loop's databases in this process, if it has any yet."""
    return _by_loop.get((os.getpid(), asyncio.get_running_loop()))


def forget_inherited_loops() -> None:
    """Drop registrations of loops that belong to the parent (run after fork)."""
    _by_loop.clear()
