"""A starting worker's look at its fleet: the running workers' connection budgets and its own.

A consumer bootstep (``app.steps['consumer']``, Celery's documented place for
one) after mingle: on the consumer's thread, on its broker connection, once,
before the worker takes tasks, as mingle asks its neighbours. Not from a thread
of the parent (a fork while that thread is inside kombu hands the child kombu's
locks held) nor from a child (its asking competed with its own publishes for
the broker connection pool).
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.worker.consumer import Mingle


class FleetCheck(bootsteps.StartStopStep):  # type: ignore[misc, unused-ignore]
    """Warn when the fleet would overfill a database server (``TaskPool.warn_about_fleet``)."""

    label = "asyncsql fleet check"
    requires = (Mingle,)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        self.enabled = hasattr(c.pool, "warn_about_fleet")  # an asyncsql pool
        self.asked = False
        super().__init__(c, **kwargs)

    def start(self, c: Any) -> None:
        if not self.asked:  # a consumer restarted after a broker loss does not ask again
            self.asked = True
            c.pool.warn_about_fleet(c.hostname, c.connection)
