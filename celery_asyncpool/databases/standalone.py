"""``session()`` and ``engine()`` outside a worker child: web apps, scripts, tests.

There the running loop gets its own engines, built on first use from a Celery
app's ``asyncsql_*`` settings: the app given to ``bind`` or ``open_databases``,
else Celery's current app (the last one created) when it configures a
database. ``open_databases`` disposes them on their loop when it exits.
Engines nobody disposed are disposed when ``asyncio.run`` (or any runner that
calls ``loop.shutdown_asyncgens()``) ends their loop, with a ``ResourceWarning``
and a logged warning saying how to dispose them; any still open at
interpreter exit are reported the same way.

A worker child's loop and the eager-mode helper's are never handled here:
their ``Runtime`` builds and disposes their engines.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _compat
from ..config import Settings
from ..errors import ConfigurationError, NoRuntimeError
from .engines import Databases, Sizing, registered

if TYPE_CHECKING:
    from celery import Celery

logger = logging.getLogger(__name__)

_bound: Celery | None = None

UNDISPOSED = ("The asyncsql engines built on event loop {loop!r} were not disposed before "
              "{when}: wrap the code that uses session() or engine() in "
              "`async with celery_asyncpool.open_databases(app):` (a FastAPI lifespan, a "
              "pytest fixture, a script's main()) so they are disposed on their own loop.")


@dataclass(eq=False)
class _Opened:
    """Engines built here for one loop, who holds them open, and their shutdown watcher."""

    databases: Databases
    holders: int = 0
    watcher: AsyncGenerator[None, None] | None = field(default=None, repr=False)


_opened: dict[int, _Opened] = {}  # by id(databases); entries leave when disposed


def bind(app: Celery) -> Celery:
    """Take the settings of ``session()`` and ``engine()`` outside a worker from ``app``.

    Call it where the app is created (``app = bind(Celery(...))`` works too);
    without it Celery's current app is used when it configures a database.
    The settings are read when a loop first needs its engines. Returns ``app``.
    """
    global _bound
    _bound = app
    return app


def settings_app(caller: str) -> Celery:
    """The app whose settings build engines outside a worker.

    Raises:
        NoRuntimeError: nothing bound, and Celery's current app has no database.
    """
    if _bound is not None:
        return _bound
    app: Celery = _compat.current_app()
    if app.conf.get("asyncsql_database_url") or app.conf.get("asyncsql_databases"):
        return app
    raise NoRuntimeError(
        f"{caller} was called outside a -P asyncsql worker child, and there is no Celery "
        "app to take the asyncsql_* settings from: call celery_asyncpool.bind(app) where "
        "your Celery app is created, or use `async with celery_asyncpool.open_databases(app):` "
        f"around this code. (Celery's current app, {app.main or 'default'!r}, sets neither "
        "asyncsql_database_url nor asyncsql_databases.)")


def build_for_this_loop(caller: str, app: Celery | None = None) -> Databases:
    """Build the running loop's engines from ``app``'s settings (default: ``settings_app``).

    Raises:
        NoRuntimeError: see ``settings_app``.
        ConfigurationError: a bad ``asyncsql_*`` setting.
    """
    settings = Settings.from_conf((app or settings_app(caller)).conf)
    databases = Databases(settings, Sizing(None, 1, settings.connection_cap))
    opened = _opened[id(databases)] = _Opened(databases)
    opened.watcher = _dispose_at_loop_shutdown(opened)
    _start(opened.watcher)
    return databases


def _start(watcher: AsyncGenerator[None, None]) -> None:
    """Run ``watcher`` to its ``yield`` now, so the running loop tracks it.

    The loop's async-generator hook registers a generator on its first step;
    ``loop.shutdown_asyncgens()`` then closes it on that loop, still running.
    """
    step = watcher.asend(None)
    try:
        step.send(None)
    except StopIteration:
        return
    raise AssertionError("the watcher awaited before its first yield")  # pragma: no cover


def at_loop_shutdown(close: Callable[[], Awaitable[Any]]) -> None:
    """Await ``close()`` on the running loop when its runner shuts it down (``asyncio.run``
    does), as the engines built here are disposed."""
    async def watcher() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await close()

    _start(watcher())


async def _dispose_at_loop_shutdown(opened: _Opened) -> AsyncGenerator[None, None]:
    """Yield once; when the loop's runner closes this generator, dispose what is still open."""
    try:
        yield
    finally:
        if opened.databases.open:
            await _dispose(opened)
            _warn_undisposed(opened.databases.loop, "their loop shut down")


async def _dispose(opened: _Opened) -> None:
    _opened.pop(id(opened.databases), None)
    await opened.databases.aclose()


def _warn_undisposed(loop: asyncio.AbstractEventLoop, when: str) -> None:
    message = UNDISPOSED.format(loop=loop, when=when)
    logger.warning("%s", message)
    warnings.warn(message, ResourceWarning, stacklevel=2)


@asynccontextmanager
async def open_databases(app: Celery | None = None) -> AsyncIterator[None]:
    """Build this loop's engines from ``app``'s settings; dispose them, on this loop, on exit.

    For a FastAPI lifespan, a pytest fixture or a script's ``main()``. Nested
    or repeated uses on one loop share the engines; the last to exit disposes
    them. In a worker child's task (or an eager task) it changes nothing: the
    worker owns that loop's engines. ``app`` defaults to the bound app, else
    Celery's current app.

    Raises:
        NoRuntimeError: no ``app`` given and none to fall back on.
        ConfigurationError: a bad setting, or this loop's engines were already
            built from another app's settings.
    """
    opened = _hold(app)
    try:
        yield
    finally:
        if opened is not None:
            opened.holders -= 1
            if opened.holders == 0 and opened.databases.open:
                await _dispose(opened)
                if opened.watcher is not None:
                    await opened.watcher.aclose()


def _hold(app: Celery | None) -> _Opened | None:
    databases = registered() or build_for_this_loop("open_databases()", app)
    opened = _opened.get(id(databases))
    if opened is None:
        return None  # a worker child's or eager-mode loop: its Runtime disposes them
    if app is not None and Settings.from_conf(app.conf) != databases.settings:
        raise ConfigurationError(
            f"open_databases({app.main or 'app'!r}): this event loop's engines were already "
            "built from other asyncsql_* settings. Use one Celery app's settings per loop "
            "(celery_asyncpool.bind(app) where the app is created).")
    opened.holders += 1
    return opened


def _report_undisposed_at_exit() -> None:
    pid = os.getpid()
    for opened in list(_opened.values()):
        if opened.databases.open and opened.databases.key[0] == pid:
            _warn_undisposed(opened.databases.loop, "the interpreter exited")


def _forget_after_fork() -> None:
    """A forked process inherits no engines to warn about: they are its parent's."""
    _opened.clear()


atexit.register(_report_undisposed_at_exit)
os.register_at_fork(after_in_child=_forget_after_fork)
