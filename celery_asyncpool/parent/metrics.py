"""Prometheus metrics of one worker, all its children together (``asyncsql_metrics_port``).

The parent serves them: it already holds what each child reports every second
(slots, tasks in flight, loop lag, each engine's pool) and sees every task's
outcome come back from the children, so one endpoint covers the worker and a
recycled child loses no count. Figures about children are read at scrape time
from their last report; task counts and runtimes are kept as they arrive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from celery.exceptions import Ignore, Reject, Retry

from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   float("inf"))


class Metrics:
    """The worker's registry: task outcomes as they come, the pool's state when scraped.

    ``pool_info`` is the pool's ``asyncsql`` entry of ``inspect stats``.
    """

    def __init__(self, pool_info: Callable[[], dict[str, Any]]) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Histogram
        except ImportError:
            raise ConfigurationError(
                "Setting asyncsql_metrics_port needs prometheus_client: "
                "pip install 'celery-asyncpool[metrics]', or unset the setting.") from None
        self.registry = CollectorRegistry(auto_describe=True)
        self._tasks = Counter("asyncsql_tasks", "Tasks that ended, by task name and state.",
                              ["task", "state"], registry=self.registry)
        self._runtime = Histogram("asyncsql_task_runtime_seconds",
                                  "How long tasks ran, by task name.", ["task"],
                                  buckets=RUNTIME_BUCKETS, registry=self.registry)
        self.registry.register(_PoolCollector(pool_info))
        self._server: Any = None

    def observe(self, name: str, outcome: Any) -> None:
        """Count one task's outcome, as a child returned it (Celery's trace result)."""
        state, runtime = outcome_state(outcome)
        self._tasks.labels(name, state).inc()
        if runtime is not None:
            self._runtime.labels(name).observe(runtime)

    def serve(self, port: int, address: str = "") -> None:
        """Answer ``GET /metrics`` on ``port``, on a thread of its own."""
        from prometheus_client import start_http_server

        started = start_http_server(port, address, registry=self.registry)
        self._server = started[0] if isinstance(started, tuple) else None
        logger.info("asyncsql pool: Prometheus metrics on port %d (/metrics)", port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def outcome_state(outcome: Any) -> tuple[str, float | None]:
    """The task state and runtime of a child's outcome: Celery's ``(failed, value, runtime)``,
    or what the parent settled a job with (a hard limit, a lost child)."""
    if not (isinstance(outcome, tuple) and len(outcome) == 3):
        return "FAILURE", None
    failed, value, runtime = outcome
    runtime = float(runtime) if isinstance(runtime, (int, float)) else None
    if not failed:
        return "SUCCESS", runtime
    exc = getattr(value, "exception", value)
    for kind, state in ((Retry, "RETRY"), (Reject, "REJECTED"), (Ignore, "IGNORED")):
        if isinstance(exc, kind):
            return state, runtime
    return "FAILURE", runtime


class _PoolCollector:
    """Gauges read from the pool's last reports, at each scrape."""

    def __init__(self, pool_info: Callable[[], dict[str, Any]]) -> None:
        self._pool_info = pool_info

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        info = self._pool_info()
        children = info.get("children", [])
        gauges = {
            "slots": GaugeMetricFamily("asyncsql_child_slots", "Task slots of each child.",
                                       labels=["child"]),
            "in-flight": GaugeMetricFamily("asyncsql_child_tasks_in_flight",
                                           "Tasks each child runs now.", labels=["child"]),
            "loop-lag-s": GaugeMetricFamily(
                "asyncsql_child_loop_lag_seconds",
                "How late each child's event loop ran its last 1 s timer.", labels=["child"]),
        }
        pools = GaugeMetricFamily("asyncsql_engine_connections",
                                  "Each child's engine pool: connections by state.",
                                  labels=["child", "database", "state"])
        waiters = GaugeMetricFamily("asyncsql_engine_waiters",
                                    "Tasks of each child waiting on an engine pool for a "
                                    "connection (a free one, or a new one opening).",
                                    labels=["child", "database"])
        for child in children:
            pid = str(child.get("pid"))
            for key, gauge in gauges.items():
                if child.get(key) is not None:
                    gauge.add_metric([pid], float(child[key]))
            for database, use in (child.get("engines") or {}).items():
                for state in ("checked_out", "checked_in", "overflow", "size"):
                    if use.get(state) is not None:
                        pools.add_metric([pid, database, state], float(use[state]))
                if use.get("waiters") is not None:
                    waiters.add_metric([pid, database], float(use["waiters"]))
        yield from gauges.values()
        yield pools
        yield waiters
        budget = GaugeMetricFamily("asyncsql_connection_budget",
                                   "Most connections the worker may open, per database.",
                                   labels=["database"])
        for database, connections in info.get("connection-budget", {}).items():
            budget.add_metric([database], float(connections))
        yield budget
        opened = GaugeMetricFamily("asyncsql_connections_open",
                                   "Connections the worker's children hold open, per database.",
                                   labels=["database"])
        for database, connections in info.get("connections", {}).items():
            opened.add_metric([database], float(connections))
        yield opened
