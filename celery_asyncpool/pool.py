"""The ``asyncsql`` pool, parent side: Celery's prefork pool with our child runtime.

Each child runs one task at a time under billiard's own work loop, on its main
thread where signals arrive (soft time limit, terminate); async bodies run on
the child's persistent loop, driven by that same thread (``child.Runtime``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from billiard.pool import Pool as _BillardBlockingPool
from celery.concurrency import prefork
from celery.concurrency.asynpool import AsynPool

from .child import Runtime
from .config import Settings
from .database import (
    Sizing,
    check_engine_options,
    connections_per_process,
    dispose_inherited_engines,
    forget_inherited_loops,
)
from .errors import AsyncPoolError, ChildStartError
from .task import install_bridges

logger = logging.getLogger(__name__)

SLOTS_PER_CHILD = 1
RESTART_DELAY_S = 1.0

_runtime: Runtime | None = None


def child_initializer(app: Any, hostname: str, processes: int) -> None:
    """Set up a child: loop first, then Celery's own initializer, then engines and hooks."""
    global _runtime
    dispose_inherited_engines()
    forget_inherited_loops()
    settings = Settings.from_conf(app.conf)
    _runtime = Runtime(settings, Sizing(SLOTS_PER_CHILD, processes, settings.connection_cap),
                       own_thread=False)
    _runtime.start_loop()
    prefork.process_initializer(app, hostname)
    install_bridges(app, _runtime, hostname)
    try:
        _runtime.open()
    except ChildStartError:
        time.sleep(RESTART_DELAY_S)  # billiard replaces the child at once: no hot restart loop
        raise


def child_destructor(pid: int, exitcode: int) -> None:
    """Stop hooks and engine disposal on the child's loop, then Celery's destructor."""
    if _runtime is not None:
        _runtime.stop()
    prefork.process_destructor(pid, exitcode)


def _with_child_runtime(base: type) -> type:
    """``base`` (billiard's pool or Celery's AsynPool) starting children with our runtime."""

    class Pool(base):  # type: ignore[misc]
        def __init__(self, *args: Any, initializer: Any = None, initargs: tuple[Any, ...] = (),
                     on_process_exit: Any = None, processes: int | None = None,
                     **kwargs: Any) -> None:
            if initializer is not prefork.process_initializer or len(initargs) != 2:
                raise AsyncPoolError(
                    "Celery's prefork pool no longer starts children with "
                    "process_initializer(app, hostname); this celery_asyncpool "
                    "version does not support this Celery version.")
            super().__init__(*args, processes=processes, initializer=child_initializer,
                             initargs=(*initargs, processes), on_process_exit=child_destructor,
                             **kwargs)

    Pool.__name__ = Pool.__qualname__ = f"AsyncSQL{base.__name__}"
    return Pool


class TaskPool(prefork.TaskPool):  # type: ignore[misc]
    """Prefork's parent side; children run ``async def`` tasks on a persistent loop.

    ``-c`` is the number of children, one task each; ``asyncsql_processes``,
    when set, must equal it.
    """

    Pool = _with_child_runtime(AsynPool)
    BlockingPool = _with_child_runtime(_BillardBlockingPool)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = Settings.from_conf(self.app.conf)
        self.settings.require_processes(self.limit)
        self.sizing = Sizing(SLOTS_PER_CHILD, self.limit, self.settings.connection_cap)
        check_engine_options(self.settings, self.sizing)

    def on_start(self) -> None:
        logger.info("asyncsql pool: %d processes, %d task slot(s) each; database "
                    "connections at most %s", self.limit, SLOTS_PER_CHILD, self._budget())
        super().on_start()

    def _budget(self) -> dict[str, int]:
        return {database.name: connections_per_process(database, self.sizing) * self.limit
                for database in self.settings.databases}

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()
        info["asyncsql"] = {
            "processes": self.limit,
            "slots-per-process": SLOTS_PER_CHILD,
            "databases": {database.name: database.masked_url
                          for database in self.settings.databases},
            "connection-budget": self._budget(),
        }
        return info
