"""The worker's connection budget: every child's engine pools, and a database result backend.

Celery's database result backend (``db+postgresql://...``) stores results
through a sync SQLAlchemy engine of its own (``celery/backends/database/
session.py``, ``SessionManager``), in each child and in the parent. A store
holds one connection for the length of one session, and each thread stores
one result at a time, so the backend holds at most one connection per thread
that stores:

- in a child, the loop thread (every async job's tracer) and the sync thread.
  Celery keeps a backend per thread (unless ``result_backend_thread_safe``):
  the loop thread's, inherited through fork, caches its engine and keeps one
  connection open; the sync thread's, made after fork, uses a ``NullPool``;
- in the parent, the consumer's thread and the pool's driver thread (hard time
  limits, revokes, lost children), through ``NullPool`` engines that close
  each connection after its store.

Budgets of databases on one server add up against its ``max_connections``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import _compat
from ..config import Settings, masked_url
from .engines import Sizing, connections_per_process

RESULT_BACKEND = "result-backend"
BACKEND_THREADS_PER_CHILD = 2
BACKEND_THREADS_IN_PARENT = 2
_DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}


@dataclass(frozen=True)
class Entry:
    """The most connections one worker may hold to one database, and where it is."""

    name: str
    masked_url: str
    server: str
    connections: int


@dataclass(frozen=True)
class ServerLimit:
    """What one database server takes, as its settings say (read through a connection)."""

    max_connections: int
    reserved: int  # superuser_reserved_connections, plus reserved_connections on 16+
    pooled: bool = False  # reached through a pooler: the fleet's clients are the pooler's
    pgbouncer: bool = False  # PgBouncer's own limit: max_connections is its max_client_conn

    @property
    def usable(self) -> int:
        """Connections the server takes from roles that are not superusers."""
        return self.max_connections - self.reserved

    def describe(self) -> str:
        """What the limit is, for a message: "above the N ..."."""
        if self.pgbouncer:
            return (f"{self.usable} client connections PgBouncer takes (max_client_conn "
                    f"{self.max_connections})")
        return (f"{self.usable} it takes from roles that are not superusers (max_connections "
                f"{self.max_connections} less {self.reserved} reserved)")


def by_server(entries: tuple[Entry, ...]) -> dict[str, int]:
    """The budget added up per server: what a worker advertises to the fleet."""
    totals: dict[str, int] = {}
    for entry in entries:
        totals[entry.server] = totals.get(entry.server, 0) + entry.connections
    return totals


def connection_budget(conf: Mapping[str, Any], settings: Settings,
                      sizing: Sizing) -> tuple[Entry, ...]:
    """Every database the worker connects to: ours, then a database result backend."""
    entries = [Entry(database.name, database.masked_url, server_of(database.url),
                     connections_per_process(database, sizing) * sizing.processes)
               for database in settings.databases]
    url = result_backend_url(conf)
    if url is not None:
        connections = BACKEND_THREADS_PER_CHILD * sizing.processes + BACKEND_THREADS_IN_PARENT
        entries.append(Entry(RESULT_BACKEND, masked_url(url), server_of(url), connections))
    return tuple(entries)


def most_children(settings: Settings, sizing: Sizing) -> int | None:
    """How many children of this sizing fit within ``asyncsql_connection_cap`` for every
    database (at least the children laid out at start); None without databases."""
    per_child = [connections_per_process(database, sizing) for database in settings.databases]
    if not per_child:
        return None
    return max(sizing.processes,
               min(sizing.connection_cap // max(1, connections) for connections in per_child))


def result_backend_url(conf: Mapping[str, Any]) -> str | None:
    """The URL of Celery's database result backend, or None for another backend."""
    backend = conf.get("result_backend")
    if not backend:
        return None
    try:
        backend_cls, url = _compat.backend_class(backend)
    except Exception:
        return None  # Celery itself reports a backend it cannot load
    from celery.backends.database import DatabaseBackend

    if not (isinstance(backend_cls, type) and issubclass(backend_cls, DatabaseBackend)):
        return None
    url = url or conf.get("database_url")
    return url if isinstance(url, str) else None


def describe(entries: tuple[Entry, ...]) -> str:
    """One line for the start-up log: the total, then each database and its URL."""
    total = sum(entry.connections for entry in entries)
    parts = ", ".join(f"{entry.name!r} {entry.connections} ({entry.masked_url})"
                      for entry in entries)
    return f"{total}: {parts}" if entries else "0"


def over_max_connections(entries: tuple[Entry, ...], limits: Mapping[str, int]) -> list[str]:
    """A problem for each server whose ``max_connections`` the budget exceeds."""
    problems = []
    for server, limit in limits.items():
        mine = [entry for entry in entries if entry.server == server]
        total = sum(entry.connections for entry in mine)
        if total <= limit:
            continue
        if len(mine) == 1:
            where = f"Database {mine[0].name!r}"
        else:
            shares = ", ".join(f"{entry.name!r} {entry.connections}" for entry in mine)
            where = f"Server {server} ({shares})"
        problems.append(f"{where}: the worker may open {total} connections, above the "
                        f"server's max_connections ({limit}); lower -c or "
                        "asyncsql_connection_cap.")
    return problems


def server_of(url: str) -> str:
    """``host:port`` of a database URL (the file for SQLite): which budgets add up."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if not parsed.host:
        return f"{parsed.get_backend_name()}:{parsed.database or ''}"
    port = parsed.port or _DEFAULT_PORTS.get(parsed.get_backend_name())
    return f"{parsed.host}:{port}"
