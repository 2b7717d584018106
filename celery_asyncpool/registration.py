"""Where the package hooks into Celery: the pool's name, the CLI, the worker being built.

Every Celery internal used here goes through ``_compat``.

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

``inspect conf``, ``inspect report`` (``celery/worker/control.py``) and
``celery report`` censor settings by key, which misses a URL nested in
``asyncsql_databases``. Celery's censoring function is wrapped to hide the
password of every URL in what it returns; a ``worker_init`` receiver also
re-registers both inspect commands, through Celery's own ``inspect_command``,
to mask the rest of their replies.

A bad setting raises ``ConfigurationError`` while the worker is built; the
``celery worker`` command's callback is wrapped to print it as a click error
(``Error: ...``, exit status 1) instead of a traceback.

Before the worker imports the task modules (Celery's ``import_modules``
signal), engines start being noted for fork safety (``databases.fork``).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from typing import Any

from . import _compat
from .config import masked_values
from .errors import ConfigurationError

logger = logging.getLogger(__name__)

POOL_NAME = "asyncsql"
POOL_PATH = "celery_asyncpool.pool:TaskPool"
MASKED_COMMANDS = ("conf", "report")


def register() -> None:
    """Make ``asyncsql`` a pool name for config, ``app.Worker`` and ``-P``.

    Raises:
        CompatibilityError: when ``celery.bin.worker`` no longer keeps its pool
            choices or its command where this package extends them.
    """
    from celery import signals

    _compat.pool_aliases().setdefault(POOL_NAME, POOL_PATH)
    signals.worker_init.connect(_remember_worker, weak=False,
                                dispatch_uid="celery_asyncpool.remember_worker")
    signals.worker_init.connect(_mask_inspect_replies, weak=False,
                                dispatch_uid="celery_asyncpool.mask_inspect_replies")
    signals.import_modules.connect(_watch_engines, weak=False,
                                   dispatch_uid="celery_asyncpool.watch_engines")
    _compat.wrap_hidden_settings_filter(masked_values)
    worker_cli = _compat.worker_cli()
    if worker_cli is not None:
        _compat.extend_pool_choices(worker_cli, POOL_NAME)
        _compat.wrap_worker_command(worker_cli, _configuration_errors_as_click_errors)


def _configuration_errors_as_click_errors(callback: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(callback)
    def worker(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except ConfigurationError as exc:
            import click

            raise click.ClickException(str(exc)) from None
    return worker


def _watch_engines(**_: Any) -> None:
    """``import_modules`` (before the worker imports task modules): note engines from now on."""
    from .databases.fork import watch_engines

    watch_engines()


def _mask_inspect_replies(**_: Any) -> None:
    """Make ``inspect conf`` and ``inspect report`` hide URL passwords, in this worker.

    Raises:
        CompatibilityError: when Celery no longer has a command this wraps.
    """
    for name in MASKED_COMMANDS:
        original, info = _compat.inspect_command(name)
        if not getattr(original, "masks_urls", False):
            _compat.register_inspect_command(name, _masked(original), info)


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


def worker_of(pool: Any) -> Any | None:
    """The worker this module saw start, if ``pool`` is its pool."""
    worker = None if _worker is None else _worker()
    return worker if worker is not None and getattr(worker, "pool", None) is pool else None


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
    autoscale, maximum = _compat.autoscale_of(worker)
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
