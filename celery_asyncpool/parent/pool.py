"""The ``asyncsql`` pool, parent side: Celery's pool hooks over our supervisor.

``-c`` is the number of task slots, spread over ``asyncsql_processes``
children; each child runs many jobs at once on its own loop
(``celery_asyncpool.child``). The supervisor, on the worker's kombu hub (or a
thread of its own without one, ``driver``), knows which job runs in which child.
"""

from __future__ import annotations

import functools
import gc
import logging
import math
import os
from contextlib import nullcontext
from typing import Any

from billiard import get_context
from celery.concurrency.base import BasePool
from kombu.asynchronous import get_event_loop

from .. import _compat, messages, results
from ..child.process import child_entry
from ..config import Settings
from ..databases import fleet
from ..databases.budget import ServerLimit, by_server, connection_budget, describe, most_children
from ..databases.checks import fleet_problems, startup_probe
from ..databases.engines import Sizing, check_engine_options
from ..databases.fork import watch_engines
from ..errors import ConfigurationError
from ..registration import POOL_PATH, autoscale_maximum, worker_of
from ..wire import PipeEnd, make_pipe
from .driver import LoopDriver
from .fleet_check import FleetCheck
from .metrics import Metrics
from .supervisor import Supervisor

logger = logging.getLogger(__name__)


# BasePool is Any without celery-types (an ignored subclass of Any); with them, unused.
class TaskPool(BasePool):  # type: ignore[misc, unused-ignore]
    """Our own parent: ``-c`` task slots spread over ``asyncsql_processes`` children.

    Each child runs up to ``ceil(slots / processes)`` jobs at once on its
    loop; the supervisor knows which job runs where, so a time limit or a
    revoke cancels one coroutine and leaves its siblings alone.

    ``limit`` keeps Celery's meaning: the slots in use now, which
    ``grow``/``shrink`` and the autoscaler move. Children are laid out at
    start for ``-c``, or the autoscale maximum when there is one; growing past
    that starts more children of the same size, as far as
    ``asyncsql_connection_cap`` allows, and shrinking retires them again.
    """

    uses_semaphore = True
    runs_coroutines = True  # how task.py tells this pool from others without importing it
    limit: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _compat.check()
        watch_engines()  # idempotent: the worker's import_modules signal did it already
        self.settings = Settings.from_conf(self.app.conf)
        autoscale = autoscale_maximum(self.limit)
        _check_slots(self.limit, autoscale)
        laid_out = autoscale or self.limit
        self.processes, self.slots_per_child = self.settings.layout(laid_out)
        self.sizing = Sizing(self.slots_per_child, self.processes, self.settings.connection_cap)
        check_engine_options(self.settings, self.sizing)
        self.budget = connection_budget(self.app.conf, self.settings, self.sizing)
        self.app.steps["consumer"].add(FleetCheck)  # the worker builds its consumer next
        self.server_limits: dict[str, ServerLimit] = {}
        self._supervisor: Supervisor | None = None
        self._driver: Any = None
        self._hub: Any = None
        self._metrics = (None if self.settings.metrics_port is None
                         else Metrics(self._pool_info_for_metrics))

    # --- start ----------------------------------------------------------------------------

    def on_start(self) -> None:
        logger.info("asyncsql pool: %d processes, %d task slot(s) each, on %s event loops; "
                    "database connections at most %s", self.processes, self.slots_per_child,
                    self.settings.loop, describe(self.budget))
        warnings, self.server_limits = startup_probe(self.settings, self.sizing, self.budget)
        for warning in warnings:
            _warn_at_start_up(warning)
        if not self.forking_enable:
            # As prefork does for spawn: Celery keys a fresh interpreter's set-up (how
            # @app.task binds, the fast tracer's registry) off this variable.
            os.environ["FORKED_BY_MULTIPROCESSING"] = "1"
        worker = worker_of(self)
        if worker is not None and getattr(worker, "consumer", None) is not None:
            messages.guard(worker.consumer)
        if self.settings.results_off_loop:
            # The states this parent writes (REVOKED, a hard limit's, a lost worker's) never
            # replace a SUCCESS a child stored; the children inherit it.
            results.install(self.app.backend)
        self._hub = None if self.options.get("threads", True) else get_event_loop()
        self._driver = self._hub if self._hub is not None else LoopDriver()
        self._supervisor = Supervisor(
            processes=self.processes, slots_per_child=self.slots_per_child, limit=self.limit,
            spawn=self._spawn_child, driver=self._driver,
            cancel_grace_s=self.settings.cancel_grace_s,
            semaphore=self.options.get("semaphore"),
            max_jobs_per_child=self.options.get("maxtasksperchild") or None)
        self._supervisor.start()
        if self._hub is None:
            self._driver.start_thread()
        if self._metrics is not None:
            self._supervisor.on_outcome = self._metrics.observe
            self._serve_metrics(self._metrics)

    def warn_about_fleet(self, node: str, connection: Any) -> None:
        """Warn when this worker and the app's running workers would together overfill a
        server; from the consumer's thread, on its broker connection (``FleetCheck``)."""
        if self.settings.fleet_check_s is None or not self.server_limits:
            return
        def echo(line: str) -> None:
            logger.info("asyncsql pool: %s", line)
        for problem in fleet_problems(self.app, self.settings, self.budget, self.server_limits,
                                      echo, own_name=f"this worker {node}", node=node,
                                      connection=connection,
                                      timeout_s=self.settings.fleet_check_s):
            _warn_at_start_up(problem)

    def _serve_metrics(self, metrics: Metrics) -> None:
        port = self.settings.metrics_port
        try:
            metrics.serve(port or 0, "0.0.0.0")
        except OSError as exc:
            raise ConfigurationError(
                f"Setting asyncsql_metrics_port has value {port}, where the worker cannot "
                f"listen ({exc}); give each worker on a host a port of its own.") from None

    def _pool_info_for_metrics(self) -> dict[str, Any]:
        """The ``asyncsql`` entry of ``inspect stats``, from the metrics server's thread."""
        for _ in range(3):  # the children may change while they are read: read again
            try:
                with self._lock():
                    info: dict[str, Any] = self._get_info()["asyncsql"]
                    return info
            except RuntimeError:
                continue
        return {}

    def register_with_event_loop(self, loop: Any) -> None:
        """Watch the children again: Celery calls this each time the consumer starts its
        loop, and after a broker connection loss the hub has dropped every fd."""
        if self._supervisor is not None and loop is self._hub:
            self._supervisor.watch()

    def _spawn_child(self, index: int) -> tuple[Any, int, int]:
        """Start one child by ``worker_pool_start_method``: forked, or a fresh interpreter.

        A forked child inherits every pipe and closes the parent's ends; a
        spawned child receives its own two ends only (``PipeEnd``), and the app
        by pickle, as Celery's prefork hands it over.
        """
        job_r, job_w = make_pipe()
        report_r, report_w = make_pipe()
        app, hostname = self.options["initargs"]
        fork = self.forking_enable
        parent_fds = [job_w, report_r, *self._parent_fds()] if fork else []
        context: Any = get_context("fork" if fork else "spawn")
        process = context.Process(
            target=child_entry, name=f"asyncsql-child-{index}", daemon=True,
            args=(parent_fds, app, hostname, self.slots_per_child, self.processes,
                  PipeEnd(job_r), PipeEnd(report_w), self.options.get("maxtasksperchild"),
                  self.options.get("max_memory_per_child")))
        _start_sharing_memory(process)
        os.close(job_r)
        os.close(report_w)
        return process, job_w, report_r

    def _parent_fds(self) -> list[int]:
        if self._supervisor is None:
            return []
        return [fd for child in self._supervisor.children.values()
                for fd in (child.job_fd, child.report_fd)]

    # --- jobs -----------------------------------------------------------------------------

    def on_apply(self, target: Any, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        assert self._supervisor is not None
        options["timeout"] = options.get("timeout") or self.options.get("timeout")
        options["soft_timeout"] = options.get("soft_timeout") or self.options.get("soft_timeout")
        with self._lock():
            return self._supervisor.apply(target, args or (), kwargs or {}, options)

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Nothing per process: Celery then calls the job's own ``terminate``, which
        cancels that one coroutine (``supervisor.Job.terminate``)."""

    def grow(self, n: int = 1) -> None:
        """Let ``n`` more jobs run at once (``pool_grow``, autoscale), as prefork's grows:
        past the children laid out at start, by starting more."""
        with self._lock():
            self.limit += n
            self._resize_semaphore(n)
            self._fit_children()

    def shrink(self, n: int = 1) -> None:
        """Let ``n`` fewer jobs run at once; children started by ``grow`` and no longer
        needed finish their jobs and leave; no job is stopped."""
        with self._lock():
            n = min(n, self.limit)
            self.limit -= n
            self._resize_semaphore(-n)
            self._fit_children()

    def _fit_children(self) -> None:
        """As many children as ``limit`` needs, never fewer than at start, within the cap."""
        wanted = max(self.processes, math.ceil(self.limit / self.slots_per_child))
        most = most_children(self.settings, self.sizing)
        if most is not None and wanted > most:
            logger.warning("asyncsql pool grown to %d slots, but only %d children of %d slot(s) "
                           "fit within asyncsql_connection_cap (%d per database), so at most %d "
                           "jobs run at once; raise the cap to grow further.", self.limit, most,
                           self.slots_per_child, self.settings.connection_cap,
                           most * self.slots_per_child)
            wanted = most
        supervisor = self._supervisor
        if supervisor is None:
            return
        if wanted != supervisor.processes:
            logger.info("asyncsql pool: %d slots now, run by %d children of %d slot(s) (was %d)",
                        self.limit, wanted, self.slots_per_child, supervisor.processes)
        supervisor.limit = self.limit
        supervisor.resize(wanted)

    def _resize_semaphore(self, n: int) -> None:
        """The worker's semaphore (with a hub) admits ``limit`` jobs: keep it in step."""
        semaphore = self.options.get("semaphore")
        if semaphore is None or n == 0:
            return
        if n > 0:
            semaphore.grow(n)
        else:
            semaphore.shrink(-n)

    def _lock(self) -> Any:
        return self._driver.lock if isinstance(self._driver, LoopDriver) else nullcontext()

    # --- stop -----------------------------------------------------------------------------

    def on_stop(self) -> None:
        """Warm shutdown: in-flight jobs finish, then each child disposes its engines and exits.

        Celery's cold shutdown also calls this, from its signal handler. When that
        handler interrupted the supervisor itself, its half-done step must not be
        re-entered: the stop is left to ``on_terminate``, which Celery calls next.
        """
        if self._supervisor is not None and self._supervisor.busy_here():
            logger.info("asyncsql pool: the cold shutdown interrupted the pool's own work; "
                        "the pool stops once the worker terminates, a moment later")
            return
        supervisor = self._take_over_driver()
        if supervisor is None:
            return
        self._driver.run_until(lambda: not supervisor.in_flight() and not supervisor.waiting)
        supervisor.stop_children(cancel=False)
        self._wait_for_children(supervisor)

    def on_terminate(self) -> None:
        """Cold shutdown: cancel every job, let the children dispose their engines, then go."""
        supervisor = self._take_over_driver()
        if supervisor is None:
            return
        supervisor.stop_children(cancel=True)
        supervisor.fail_waiting()
        self._wait_for_children(supervisor)

    def _take_over_driver(self) -> Supervisor | None:
        """Serve the children from this thread from now on: the hub has stopped."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return None
        if isinstance(self._driver, LoopDriver):
            self._driver.stop_thread()
        else:
            driver = LoopDriver()
            driver.on_tick = functools.partial(_compat.flush_stopped_hub, self._hub)
            supervisor.move_to(driver)
            self._driver = driver
        return supervisor

    def _wait_for_children(self, supervisor: Supervisor) -> None:
        grace = self.settings.cancel_grace_s + self.settings.hook_timeout_s
        if not self._driver.run_until(lambda: not supervisor.children, timeout_s=grace):
            logger.warning("asyncsql children %s did not exit within %ss; killing them",
                           sorted(supervisor.children), grace)
            supervisor.kill_all()
            self._driver.run_until(lambda: not supervisor.children, timeout_s=5)
        self._driver.close()
        _wake(self._hub)
        if self._metrics is not None:
            self._metrics.close()

    # --- reporting ------------------------------------------------------------------------

    def _get_info(self) -> dict[str, Any]:
        info: dict[str, Any] = super()._get_info()  # type: ignore[misc, unused-ignore]
        supervisor = self._supervisor
        # The keys prefork reports, which tools such as Flower read; the implementation
        # is the path users configure, where the class lives being ours to move.
        info.update({
            "implementation": POOL_PATH,
            "processes": [] if supervisor is None else sorted(supervisor.children),
            "max-tasks-per-child": self.options.get("maxtasksperchild") or "N/A",
            "max-memory-per-child": self.options.get("max_memory_per_child") or "N/A",
            "put-guarded-by-semaphore": self.putlocks,
            "timeouts": (self.options.get("soft_timeout") or 0, self.options.get("timeout") or 0),
        })
        children = [] if supervisor is None else supervisor.info()
        info["asyncsql"] = {
            "processes": self.processes,
            "slots-per-process": self.slots_per_child,
            "driver": "thread" if isinstance(self._driver, LoopDriver) else "hub",
            "in-flight": 0 if supervisor is None else supervisor.in_flight(),
            "children": children,
            "connections": open_connections(children),
            "databases": {entry.name: entry.masked_url for entry in self.budget},
            "connection-budget": {entry.name: entry.connections for entry in self.budget},
            fleet.BUDGET_KEY: by_server(self.budget),
        }
        return info


def _warn_at_start_up(problem: str) -> None:
    logger.warning("asyncsql pool at start-up: %s The worker runs on; "
                   "`celery asyncsql check` tells more.", problem)


def open_connections(children: list[dict[str, Any]]) -> dict[str, int]:
    """Connections open per database, all children together, as their last reports say."""
    totals: dict[str, int] = {}
    for child in children:
        for name, use in (child.get("engines") or {}).items():
            held = (use.get("checked_in") or 0) + (use.get("checked_out") or 0)
            totals[name] = totals.get(name, 0) + held
    return totals


def _check_slots(limit: Any, autoscale: int | None) -> None:
    """``-c`` / ``worker_concurrency`` must be a count of slots (0 only as an autoscale minimum).

    Raises:
        ConfigurationError: naming the setting, its value and the fix.
    """
    least = 0 if autoscale else 1
    if not isinstance(limit, int) or limit < least or (autoscale is not None and autoscale < 1):
        value = limit if autoscale is None else f"{limit} (--autoscale maximum {autoscale})"
        raise ConfigurationError(
            f"Setting worker_concurrency (-c) has value {value}; expected a whole number of "
            "task slots >= 1 (the asyncsql pool's slots, all children together), e.g. -c 100.")


def _start_sharing_memory(process: Any) -> None:
    """Start ``process`` with the parent's objects frozen out of its garbage collector.

    A forked child's collections would otherwise write to every inherited object's
    header, copying the parent's heap page by page into each child (Python's
    ``gc.freeze`` documentation); frozen, those pages stay shared. The parent
    collects them again as soon as the child is started.
    """
    gc.freeze()
    try:
        process.start()
    finally:
        gc.unfreeze()


def _wake(hub: Any) -> None:
    """End the hub's current wait. Celery's cold shutdown stops the pool from a signal
    handler, then the hub polls on; with our pipes gone from it, only a broker
    that talks (Redis does every second, RabbitMQ may not) would wake it to exit."""
    if hub is None:
        return
    wake_r, wake_w = os.pipe()

    def woken() -> None:
        hub.remove_reader(wake_r)
        os.close(wake_r)

    hub.add_reader(wake_r, woken)
    os.write(wake_w, b"\0")
    os.close(wake_w)
