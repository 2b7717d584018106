"""The ``asyncsql`` tasks with ``asyncsql_loop = "uvloop"``: each child runs them on uvloop."""

from __future__ import annotations

from .asyncsql import app

app.conf.asyncsql_loop = "uvloop"
