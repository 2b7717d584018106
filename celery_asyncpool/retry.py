"""What a database outage raises in a task body: ``autoretry_for=DATABASE_ERRORS``.

Measured with SQLAlchemy 2.1 and asyncpg 0.32 (tests/faults/test_database.py),
an outage reaches the task as one of three unrelated kinds of error:

- a connection lost in the middle of a statement (server restart, network cut,
  ``pg_terminate_backend``): ``sqlalchemy.exc.DBAPIError`` itself, not its
  ``OperationalError`` or ``InterfaceError`` subclasses;
- a connection that cannot be made: the ``OSError`` the socket raised
  (``ConnectionRefusedError``, ``ConnectionResetError``, ``socket.gaierror``,
  ``TimeoutError``), unwrapped;
- a connection lost while SQLAlchemy sets it up (its on-connect codec queries):
  asyncpg's own error (``InterfaceError: connection is closed``), unwrapped.

SQLAlchemy wraps what an async driver raises while connecting only in part
(sqlalchemy/sqlalchemy#11956). ``DBAPIError`` is also the base of errors a retry
does not mend (``IntegrityError``): bound ``max_retries``, or list those in
``dont_autoretry_for``.

A module of its own: ``import celery_asyncpool``, which every ``celery`` command
does, stays free of SQLAlchemy.
"""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
from sqlalchemy.exc import DBAPIError

__all__ = ("DATABASE_ERRORS",)

DATABASE_ERRORS: tuple[type[Exception], ...] = (
    DBAPIError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
