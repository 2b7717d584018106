"""Exceptions raised by celery_asyncpool."""

from __future__ import annotations

from celery.exceptions import ImproperlyConfigured


class AsyncPoolError(Exception):
    """Base class for every error this package raises."""


# Without celery-types, Celery is untyped (Any); with them, the ignore is unused.
class ConfigurationError(AsyncPoolError, ImproperlyConfigured):  # type: ignore[misc, unused-ignore]
    """An ``asyncsql_*`` setting has a wrong name, type or value.

    The ``celery`` command prints it alone (``Error: ...``, exit status 1):
    ``registration`` turns it into a click error there.
    """


class CompatibilityError(AsyncPoolError):
    """An installed Celery, kombu, billiard or Python lacks an internal the pool relies on."""


class NoRuntimeError(AsyncPoolError):
    """``session()`` or ``engine()`` was called where no asyncsql loop runs."""


class BridgeError(AsyncPoolError):
    """A coroutine task body cannot be run to completion from here."""


class TaskCancelledError(AsyncPoolError):
    """A coroutine task body was cancelled by something other than the pool."""


class ChildStartError(AsyncPoolError):
    """A child process could not start: an ``on_child_start`` hook failed."""
