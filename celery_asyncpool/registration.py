"""The one place that touches Celery's pool registry, its CLI state and its worker.

``celery.bin.worker`` builds the ``-P`` option's choices (``WORKERS_POOL``, a
click ``Choice``) when it is imported, from ``celery.concurrency.ALIASES``.
The ``celery`` command imports it before it loads our ``celery.commands``
entry point, so the alias alone is not enough for ``-P asyncsql``: the
already-built choices must be extended too. Config (``worker_pool``) and
``app.Worker(pool_cls=...)`` need only the alias.

The worker's ``Pool`` bootstep hands the pool only ``min_concurrency``
(``celery/worker/components.py``, ``Pool.create``); the autoscale maximum is
on the worker. A ``worker_init`` receiver remembers the worker being built,
so the pool can lay its children out for that maximum (``autoscale_maximum``).

``inspect conf`` and ``inspect report`` (``celery/worker/control.py``)
censor settings by key, which misses a URL nested in ``asyncsql_databases``.
Another ``worker_init`` receiver re-registers both commands, through Celery's
own ``inspect_command``, to hide the password of every URL in their replies.
"""

from __future__ import annotations

import functools
import logging
import sys
import weakref
from typing import Any

from .config import masked_values
from .errors import AsyncPoolError

logger = logging.getLogger(__name__)

POOL_NAME = "asyncsql"
POOL_PATH = "celery_asyncpool.pool:TaskPool"
MASKED_COMMANDS = ("conf", "report")


def register() -> None:
    """Make ``asyncsql`` a pool name for config, ``app.Worker`` and ``-P``.

    Raises:
        AsyncPoolError: when ``celery.bin.worker`` no longer keeps its pool
            choices where this package extends them.
    """
    from celery import concurrency, signals

    concurrency.ALIASES.setdefault(POOL_NAME, POOL_PATH)
    signals.worker_init.connect(_remember_worker, weak=False,
                                dispatch_uid="celery_asyncpool.remember_worker")
    signals.worker_init.connect(_mask_inspect_replies, weak=False,
                                dispatch_uid="celery_asyncpool.mask_inspect_replies")
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


def _mask_inspect_replies(**_: Any) -> None:
    """Make ``inspect conf`` and ``inspect report`` hide URL passwords, in this worker.

    Raises:
        AsyncPoolError: when Celery no longer has a command this wraps.
    """
    from celery.worker import control

    for name in MASKED_COMMANDS:
        original = control.Panel.data.get(name)
        info = control.Panel.meta.get(name)
        if original is None or info is None:
            raise AsyncPoolError(
                f"celery.worker.control no longer registers the `{name}` inspect command "
                f"whose reply celery_asyncpool masks, so it could show database passwords "
                f"from asyncsql_databases. Pin celery<5.8 or report this Celery version.")
        if not getattr(original, "masks_urls", False):
            control.inspect_command(
                name=name, alias=info.alias, signature=info.signature, args=info.args,
                default_timeout=info.default_timeout, help=info.help)(_masked(original))


def _masked(command: Any) -> Any:
    @functools.wraps(command)
    def masked(state: Any, *args: Any, **kwargs: Any) -> Any:
        return masked_values(command(state, *args, **kwargs))

    masked.masks_urls = True  # type: ignore[attr-defined]
    return masked


_worker: weakref.ref[Any] | None = None


def _remember_worker(sender: Any = None, **_: Any) -> None:
    """``worker_init`` (sent by ``WorkController.setup_instance``): the worker being built."""
    global _worker
    _worker = None if sender is None else weakref.ref(sender)


def autoscale_maximum(limit: int) -> int | None:
    """The ``--autoscale`` maximum of the worker now creating a pool of ``limit`` slots.

    None when there is no autoscale, or when the pool is not being created by a
    worker this module saw start (``TaskPool`` built by hand). When Celery no
    longer keeps the maximum where this reads it, logs a warning saying what
    the worker loses and returns None.
    """
    worker = None if _worker is None else _worker()
    if worker is None or getattr(worker, "pool", None) is not None:
        return None  # no worker, or its pool was created already: not this pool's worker
    autoscale = getattr(worker, "autoscale", None)
    maximum = getattr(worker, "max_concurrency", None)
    if not autoscale:
        return None
    if not isinstance(maximum, int) or isinstance(maximum, bool):
        logger.warning(
            "asyncsql pool: --autoscale is set (%r) but this Celery version's worker has no "
            "usable max_concurrency (%r found); children are laid out for %d slot(s) only, so "
            "autoscale cannot grow past that. Use -c instead of --autoscale, or report this "
            "Celery version to celery_asyncpool.", autoscale, maximum, limit)
        return None
    return maximum if maximum > limit else None
