"""Exceptions raised by celery_asyncpool."""

from __future__ import annotations

from celery.exceptions import ImproperlyConfigured
from click import ClickException


class AsyncPoolError(Exception):
    """Base class for every error this package raises."""


class ConfigurationError(AsyncPoolError, ImproperlyConfigured, ClickException):  # type: ignore[misc]
    """An ``asyncsql_*`` setting has a wrong name, type or value.

    A ``ClickException`` too, so the ``celery`` command prints the message
    alone (``Error: ...``, exit status 1) rather than a traceback.
    """


class NoRuntimeError(AsyncPoolError):
    """``session()`` or ``engine()`` was called where no asyncsql loop runs."""


class BridgeError(AsyncPoolError):
    """A coroutine task body cannot be run to completion from here."""


class TaskCancelledError(AsyncPoolError):
    """A coroutine task body was cancelled by something other than the pool."""


class ChildStartError(AsyncPoolError):
    """A child process could not start: an ``on_child_start`` hook failed."""
