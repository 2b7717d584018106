"""The one place that touches Celery's pool registry and its CLI state.

``celery.bin.worker`` builds the ``-P`` option's choices (``WORKERS_POOL``, a
click ``Choice``) when it is imported, from ``celery.concurrency.ALIASES``.
The ``celery`` command imports it before it loads our ``celery.commands``
entry point, so the alias alone is not enough for ``-P asyncsql``: the
already-built choices must be extended too. Config (``worker_pool``) and
``app.Worker(pool_cls=...)`` need only the alias.
"""

from __future__ import annotations

import sys

from .errors import AsyncPoolError

POOL_NAME = "asyncsql"
POOL_PATH = "celery_asyncpool.pool:TaskPool"


def register() -> None:
    """Make ``asyncsql`` a pool name for config, ``app.Worker`` and ``-P``.

    Raises:
        AsyncPoolError: when ``celery.bin.worker`` no longer keeps its pool
            choices where this package extends them.
    """
    from celery import concurrency

    concurrency.ALIASES.setdefault(POOL_NAME, POOL_PATH)
    worker_cli = sys.modules.get("celery.bin.worker")
    if worker_cli is not None:
        _extend_cli_choices(worker_cli)


def _extend_cli_choices(worker_cli: object) -> None:
    option = getattr(worker_cli, "WORKERS_POOL", None)
    choices = getattr(option, "choices", None)
    if not isinstance(choices, (list, tuple)):
        raise AsyncPoolError(
            "celery.bin.worker.WORKERS_POOL no longer holds the -P choices this package "
            "extends, so `-P asyncsql` cannot be offered on this Celery version; set "
            "worker_pool = 'asyncsql' in the Celery config instead.")
    if POOL_NAME not in choices:
        option.choices = (*choices, POOL_NAME)  # type: ignore[union-attr]
