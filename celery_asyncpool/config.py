"""The ``asyncsql_*`` settings: defined once here, validated at start-up.

Every setting is read from the Celery app's configuration. ``database_*``
keys belong to Celery's own database result backend, hence the prefix.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigurationError

PREFIX = "asyncsql_"
_ASYNC_DRIVERS = {"postgresql": "asyncpg", "sqlite": "aiosqlite", "mysql": "asyncmy"}
DEFAULT_DATABASE = "default"
LOOPS = ("asyncio", "uvloop")


@dataclass(frozen=True)
class Option:
    """One setting: its key, default, what it accepts and what it does."""

    key: str
    default: Any
    expected: str
    doc: str
    check: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_str_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) for k in value)


OPTIONS: tuple[Option, ...] = (
    Option("asyncsql_processes", None, "a whole number >= 1, or None",
           "Child processes. The worker's concurrency (-c) is its task slots, spread "
           "over them: each child runs up to ceil(slots / processes) tasks at once. "
           "None means the CPU count, at most -c.",
           lambda v: v is None or (_is_int(v) and v >= 1)),
    Option("asyncsql_database_url", None, "an async SQLAlchemy URL string, or None",
           "URL of the database named 'default', e.g. "
           "'postgresql+asyncpg://user@host/db' or 'sqlite+aiosqlite:///app.db'.",
           lambda v: v is None or isinstance(v, str)),
    Option("asyncsql_engine_options", {}, "a dict of create_async_engine() keyword arguments",
           "Passed to create_async_engine() for the default database. pool_size "
           "defaults to the child's task slots and max_overflow to 0 for queue pools.",
           _is_str_dict),
    Option("asyncsql_session_options", {}, "a dict of async_sessionmaker() keyword arguments",
           "Passed to async_sessionmaker() for the default database; "
           "expire_on_commit defaults to False.",
           _is_str_dict),
    Option("asyncsql_databases", {}, "a dict of name -> URL string or "
           "{'url': ..., 'engine_options': {...}, 'session_options': {...}, "
           "'pgbouncer': True or False}",
           "More databases, reached with session(name) and engine(name).",
           _is_str_dict),
    Option("asyncsql_pgbouncer", False, "True or False",
           "The databases sit behind a transaction-mode pooler (PgBouncer): each engine "
           "is set up for it (asyncpg: no statement caches, unnamed statements; psycopg: "
           "no prepared statements). Per database: 'pgbouncer' in its asyncsql_databases "
           "entry. `celery asyncsql check` fails, and a worker warns, when a pooler is "
           "found without it (docs/pgbouncer.md).",
           lambda v: isinstance(v, bool)),
    Option("asyncsql_dead_host_timeout_s", 30, "a whole number of seconds >= 2, or None",
           "How soon PostgreSQL frees the connections of a worker host that went away "
           "without closing them (power loss, network cut), so that they stop counting "
           "against max_connections: each connection sets the server's TCP keepalives "
           "and tcp_user_timeout to notice within this. Not behind a pooler (set "
           "PgBouncer's own). None leaves the server's settings (Linux: about 2 hours).",
           lambda v: v is None or (_is_int(v) and v >= 2)),
    Option("asyncsql_fleet_check_s", 1.0, "a number of seconds > 0, or None",
           "How long a starting worker waits for the app's running workers to tell "
           "their connection budgets (inspect stats, as mingle waits for its neighbours) "
           "before it takes tasks; it warns when the fleet together would pass a "
           "server's max_connections (or PgBouncer's max_client_conn). None asks no one "
           "(`celery asyncsql check` still adds the fleet up).",
           lambda v: v is None or (_is_number(v) and v > 0)),
    Option("asyncsql_connection_cap", 80, "a whole number >= 1",
           "Most database connections all children of one worker may hold, per "
           "database; pool_size defaults are lowered to stay within it.",
           lambda v: _is_int(v) and v >= 1),
    Option("asyncsql_hook_timeout_s", 30.0, "a number of seconds > 0",
           "Longest time each on_child_start / on_child_stop hook may run.",
           lambda v: _is_number(v) and v > 0),
    Option("asyncsql_cancel_grace_s", 5.0, "a number of seconds >= 0",
           "How long a cancelled coroutine (soft time limit, terminate, "
           "shutdown) may take to unwind before the child stops waiting for it.",
           lambda v: _is_number(v) and v >= 0),
    Option("asyncsql_loop_block_warning_s", 1.0, "a number of seconds > 0, or None",
           "Log a WARNING, naming the task and showing its stack, when code blocks a "
           "child's event loop (and so every other task of that child) for longer "
           "than this. None turns the watchdog off.",
           lambda v: v is None or (_is_number(v) and v > 0)),
    Option("asyncsql_switch_interval_s", 0.001, "a number of seconds > 0, or None",
           "sys.setswitchinterval() in each child: how soon its loop gets the GIL back "
           "from a CPU-bound sync task or to_thread call. Beside such a task, 0.001 gave "
           "the loop's coroutines 3x the database round trips of Python's 0.005, for 10% "
           "of the sync task's speed. None leaves Python's value.",
           lambda v: v is None or (_is_number(v) and v > 0)),
    Option("asyncsql_loop", "asyncio", "'asyncio' or 'uvloop'",
           "The event loop each child runs: asyncio's own, or uvloop's (pip install "
           "celery-asyncpool[uvloop]); docs/uvloop.md gives its measured effect.",
           lambda v: v in LOOPS),
    Option("asyncsql_metrics_port", None, "a TCP port number (1-65535), or None",
           "Serve Prometheus metrics of the worker, all its children together, at "
           "http://<host>:<port>/metrics (pip install 'celery-asyncpool[metrics]'): "
           "slots and tasks in flight per child, loop lag, engine pools, tasks by name "
           "and state with their runtimes, the connection budget (docs/metrics.md). "
           "None serves nothing.",
           lambda v: v is None or (_is_int(v) and 1 <= v <= 65535)),
    Option("asyncsql_results_off_loop", True, "True or False",
           "Keep Celery's own I/O in an async task's tracer off the child's loop: "
           "states stored on a Redis backend in one redis.asyncio script call, chord "
           "parts, link publishes and errbacks on a thread. False stores and publishes "
           "synchronously on the loop, as Celery's code does (the benchmark's control).",
           lambda v: isinstance(v, bool)),
)
KNOWN_KEYS = tuple(option.key for option in OPTIONS)


@dataclass(frozen=True)
class DatabaseSettings:
    """One named database: its URL and the options its engine and sessions get."""

    name: str
    url: str
    engine_options: Mapping[str, Any]
    session_options: Mapping[str, Any]
    pgbouncer: bool = False  # behind a transaction-mode pooler: no server-side statements

    @property
    def masked_url(self) -> str:
        """The URL with its password hidden, safe for logs and banners."""
        return masked_url(self.url)


def masked_url(url: str) -> str:
    """``url`` with its password hidden, safe for logs, banners and ``inspect``."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


_SECRET_KEY = re.compile("pass|secret|token", re.IGNORECASE)
SECRET_MASK = "********"
_URL_PASSWORD = re.compile(r"([a-zA-Z][\w+.-]*://[^:/?#@\s'\"]*):[^@/?#\s'\"]+@")


def masked_values(value: Any) -> Any:
    """``value`` with the password of every URL in its strings hidden, at any depth,
    and every value under a key that names a secret (``connect_args={"password": ...}``).

    Celery censors a setting by its key alone, so a URL nested in
    ``asyncsql_databases`` would otherwise reach ``inspect conf``, ``inspect
    report`` and ``celery report`` as written.
    """
    if isinstance(value, Mapping):
        return {key: SECRET_MASK if isinstance(key, str) and _SECRET_KEY.search(key)
                else masked_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [masked_values(item) for item in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1:***@", value)
    return value


@dataclass(frozen=True)
class Settings:
    """The validated ``asyncsql_*`` settings of one Celery app."""

    processes: int | None
    databases: tuple[DatabaseSettings, ...]
    connection_cap: int
    hook_timeout_s: float
    cancel_grace_s: float
    loop_block_warning_s: float | None
    switch_interval_s: float | None
    loop: str = "asyncio"
    results_off_loop: bool = True
    dead_host_timeout_s: int | None = 30
    fleet_check_s: float | None = 1.0
    metrics_port: int | None = None

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> Settings:
        """Read and validate the settings.

        Raises:
            ConfigurationError: naming the key, the value found and what is
                expected, for an unknown ``asyncsql_*`` key, a wrong type or
                range, or a URL whose driver is not async.
        """
        _reject_unknown_keys(conf)
        values = {option.key: _checked(option, conf) for option in OPTIONS}
        return cls(
            processes=values["asyncsql_processes"],
            databases=_databases(values),
            connection_cap=values["asyncsql_connection_cap"],
            hook_timeout_s=float(values["asyncsql_hook_timeout_s"]),
            cancel_grace_s=float(values["asyncsql_cancel_grace_s"]),
            loop_block_warning_s=_seconds_or_none(values["asyncsql_loop_block_warning_s"]),
            switch_interval_s=_seconds_or_none(values["asyncsql_switch_interval_s"]),
            loop=_checked_loop(values["asyncsql_loop"]),
            results_off_loop=values["asyncsql_results_off_loop"],
            dead_host_timeout_s=values["asyncsql_dead_host_timeout_s"],
            fleet_check_s=values["asyncsql_fleet_check_s"],
            metrics_port=values["asyncsql_metrics_port"],
        )

    def layout(self, slots: int) -> tuple[int, int]:
        """Child processes and task slots per child for a worker with ``slots`` (``-c``)."""
        processes = min(self.processes or os.cpu_count() or 1, slots)
        return processes, math.ceil(slots / processes)

    def database(self, name: str) -> DatabaseSettings:
        """The settings of database ``name``.

        Raises:
            ConfigurationError: when no database of that name is configured.
        """
        for database in self.databases:
            if database.name == name:
                return database
        raise ConfigurationError(_unknown_database_message(name, self.databases))


def _seconds_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _checked_loop(loop: str) -> str:
    if loop == "uvloop":
        try:
            importlib.import_module("uvloop")
        except ImportError as exc:
            raise ConfigurationError(
                f"Setting asyncsql_loop has value 'uvloop', which cannot be imported ({exc}); "
                "install it with: pip install 'celery-asyncpool[uvloop]', or set 'asyncio'."
            ) from None
    return loop


def new_event_loop(loop: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``asyncsql_loop`` names (checked by ``Settings``)."""
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _reject_unknown_keys(conf: Mapping[str, Any]) -> None:
    for key in conf:
        if isinstance(key, str) and key.lower().startswith(PREFIX) and key not in KNOWN_KEYS:
            close = difflib.get_close_matches(key.lower(), KNOWN_KEYS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigurationError(
                f"Unknown setting {key!r} (value {masked_values(conf[key])!r}).{hint} "
                f"Known settings: {', '.join(KNOWN_KEYS)}."
            )


def _checked(option: Option, conf: Mapping[str, Any]) -> Any:
    value = conf.get(option.key, option.default)
    if not option.check(value):
        raise ConfigurationError(
            f"Setting {option.key} has value {value!r}; expected {option.expected}."
        )
    return value


def _databases(values: Mapping[str, Any]) -> tuple[DatabaseSettings, ...]:
    found: list[DatabaseSettings] = []
    url = values["asyncsql_database_url"]
    if url is not None:
        found.append(_database(
            DEFAULT_DATABASE, url,
            values["asyncsql_engine_options"], values["asyncsql_session_options"],
            key="asyncsql_database_url", pgbouncer=values["asyncsql_pgbouncer"],
        ))
    for name, spec in values["asyncsql_databases"].items():
        key = f"asyncsql_databases[{name!r}]"
        if name == DEFAULT_DATABASE and url is not None:
            raise ConfigurationError(
                f"Setting {key} names the database 'default', which "
                "asyncsql_database_url already defines; set only one of them."
            )
        found.append(_database_from_spec(name, spec, key, values["asyncsql_pgbouncer"]))
    return tuple(found)


def _database_from_spec(name: str, spec: Any, key: str, pgbouncer: bool) -> DatabaseSettings:
    if isinstance(spec, str):
        return _database(name, spec, {}, {}, key=key, pgbouncer=pgbouncer)
    allowed = {"url", "engine_options", "session_options", "pgbouncer"}
    if not _is_str_dict(spec) or "url" not in spec or set(spec) - allowed:
        raise ConfigurationError(
            f"Setting {key} has value {masked_values(spec)!r}; expected a URL string or a "
            "dict with 'url' and optionally 'engine_options', 'session_options' and "
            "'pgbouncer'."
        )
    for part in ("engine_options", "session_options"):
        if not _is_str_dict(spec.get(part, {})):
            raise ConfigurationError(
                f"Setting {key}[{part!r}] has value {spec[part]!r}; expected a dict."
            )
    if not isinstance(spec.get("pgbouncer", pgbouncer), bool):
        raise ConfigurationError(
            f"Setting {key}['pgbouncer'] has value {spec['pgbouncer']!r}; expected True or "
            "False."
        )
    return _database(name, spec["url"], spec.get("engine_options", {}),
                     spec.get("session_options", {}), key=key,
                     pgbouncer=spec.get("pgbouncer", pgbouncer))


def _database(name: str, url: Any, engine_options: Mapping[str, Any],
              session_options: Mapping[str, Any], *, key: str,
              pgbouncer: bool = False) -> DatabaseSettings:
    if not isinstance(url, str):
        raise ConfigurationError(
            f"Setting {key} has value {url!r}; expected an async SQLAlchemy URL string."
        )
    _check_async_url(url, key)
    return DatabaseSettings(name, url, dict(engine_options), dict(session_options), pgbouncer)


def _check_async_url(url: str, key: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            f"Setting {key} is not a database URL; expected e.g. "
            "'postgresql+asyncpg://user@host/db'."
        ) from None
    masked = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect().get_async_dialect_cls(parsed)
    except NoSuchModuleError:
        raise ConfigurationError(
            f"Setting {key} has value {masked!r}, whose dialect or driver "
            f"{parsed.drivername!r} SQLAlchemy does not know."
        ) from None
    if not dialect.is_async:
        backend = parsed.get_backend_name()
        driver = _ASYNC_DRIVERS.get(backend, "<async driver>")
        raise ConfigurationError(
            f"Setting {key} has value {masked!r}, whose driver "
            f"{parsed.get_driver_name()!r} is not async; expected an async driver, "
            f"e.g. '{backend}+{driver}://...'."
        )


def _unknown_database_message(name: str, databases: tuple[DatabaseSettings, ...]) -> str:
    if not databases:
        return (f"No database named {name!r}: no database is configured. Set "
                "asyncsql_database_url (or asyncsql_databases) in the Celery config.")
    names = ", ".join(repr(d.name) for d in databases)
    return f"No database named {name!r}; configured databases: {names}."


def settings_reference() -> str:
    """The settings as a Markdown table, for docs/settings.md (a test keeps them equal)."""
    rows = ["| setting | default | accepts | what it does |", "|---|---|---|---|"]
    rows += [f"| `{o.key}` | `{o.default!r}` | {o.expected} | {o.doc} |" for o in OPTIONS]
    return "\n".join(rows)
