"""``session()`` and ``engine()``: the running loop's, wherever it runs.

In a worker child (or eager mode) the loop's ``Runtime`` built them; on any
other loop they are built on first use (``standalone``). A task body's
sessions are noted for the child's clean-up (``note_sessions``), which the
child sets up without this side knowing the child.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

from ..config import DEFAULT_DATABASE
from ..errors import NoRuntimeError
from .engines import Databases, registered
from .standalone import build_for_this_loop

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

_noted: contextvars.ContextVar[list[AsyncSession] | None] = contextvars.ContextVar(
    "celery_asyncpool_sessions", default=None)


def note_sessions(sessions: list[AsyncSession]) -> None:
    """From now on, in the current context, add each session ``session()`` opens to ``sessions``."""
    _noted.set(sessions)


def noted(opened: AsyncSession) -> AsyncSession:
    """Note ``opened`` for the task body running now, if any (``note_sessions``); return it."""
    sessions = _noted.get()
    if sessions is not None:
        sessions.append(opened)
    return opened


def _current(caller: str) -> Databases:
    try:
        databases = registered()
    except RuntimeError:
        raise NoRuntimeError(
            f"{caller} needs a running event loop: call it inside a coroutine (an async "
            "task, a FastAPI handler, a script's asyncio.run(main()))."
        ) from None
    if databases is None:
        databases = build_for_this_loop(caller)
    return databases


def session(name: str = DEFAULT_DATABASE) -> AsyncSession:
    """A new ``AsyncSession`` on this loop's engine for database ``name``.

    Use it as ``async with session() as s:``. Sessions default to
    ``expire_on_commit=False``, so attributes stay readable after commit.
    Outside a worker child the loop's engines are built on first use from the
    bound app's settings (``celery_asyncpool.bind``); see ``open_databases``.
    One that a worker's task body leaves in a transaction is rolled back and
    closed when the body returns, with a warning (``child.leftovers``).

    Raises:
        NoRuntimeError: without a running loop, or outside a worker with no app to
            take the settings from (see the message for what to do).
        ConfigurationError: when no database ``name`` is configured.
    """
    return noted(_current("session()").sessionmaker(name)())


def engine(name: str = DEFAULT_DATABASE) -> AsyncEngine:
    """This loop's ``AsyncEngine`` for database ``name``.

    Use it on the loop that asked for it: each loop has its own engines.

    Raises:
        NoRuntimeError: as for ``session()``.
        ConfigurationError: when no database ``name`` is configured.
    """
    return _current("engine()").engine(name)
