"""``asyncsql_metrics_port``: a real worker's Prometheus endpoint, scraped while it runs
tasks and after, against what the tasks did, ``inspect stats`` and ``pg_stat_activity``."""

from __future__ import annotations

import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from tests.celery_suite.run import free_port

from . import tasks, tasks_slots
from .conftest import PG_DSN, eventually

INCLUDE = "tests.integration.tasks,tests.integration.tasks_slots"


def scrape(port: int, address: str = "127.0.0.1") -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics`` at ``address:port``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(value for (found, found_labels), value in samples.items() if found == name
               and all(dict(found_labels).get(k) == v for k, v in labels.items()))


def test_a_scraped_worker_shows_its_slots_connections_and_task_outcomes(worker_factory):
    port = free_port()
    # Two slots and one connection per child (named after the worker): of 4 tasks holding
    # a connection each, two wait for one.
    conf = {"asyncsql_metrics_port": port, "asyncsql_processes": 2,
            "asyncsql_engine_options": {"pool_size": 1}}
    with worker_factory(concurrency=4, include=INCLUDE, conf=conf) as worker:
        worker.wait_for_children(2)
        running = [worker.send(tasks_slots.db_span, 2) for _ in range(4)]
        busy = eventually(lambda: (lambda s: s if total(
            s, "asyncsql_child_tasks_in_flight") == 4 and total(
            s, "asyncsql_engine_connections", state="checked_out") == 2 and total(
            s, "asyncsql_engine_waiters") == 2 else None)(scrape(port)),
            30, "the scrape to show 4 tasks: 2 holding the 2 connections, 2 waiting")
        assert [r.get(timeout=30)["child"] for r in running]
        retried = worker.send(tasks.async_retry)
        rejected = worker.send(tasks.async_reject)
        assert worker.send(tasks.async_add, 1, 2).get(timeout=30) == 3
        for result in (retried, rejected):
            result.get(timeout=30, propagate=False)
        at_rest = eventually(lambda: (lambda s: s if total(
            s, "asyncsql_tasks_total", task="tests.integration.tasks.async_retry") >= 3
            and total(s, "asyncsql_child_tasks_in_flight") == 0 else None)(scrape(port)),
            30, "the outcomes counted and nothing in flight")
        stats = worker.inspect().stats()[worker.hostname]["pool"]["asyncsql"]
        eventually(lambda: total(scrape(port), "asyncsql_connections_open") == _backends(worker)
                   == sum(stats["connections"].values()) or None, 10,
                   "the scraped connections to match pg_stat_activity and inspect stats")
    assert total(busy, "asyncsql_child_slots") == 4
    assert total(at_rest, "asyncsql_tasks_total", task="tests.integration.tasks_slots.db_span",
                 state="SUCCESS") == 4
    assert total(at_rest, "asyncsql_task_runtime_seconds_count",
                 task="tests.integration.tasks_slots.db_span") == 4
    assert total(at_rest, "asyncsql_task_runtime_seconds_sum",
                 task="tests.integration.tasks_slots.db_span") >= 2 * 2 + 2 * 4  # two waited
    assert total(at_rest, "asyncsql_engine_waiters") == 0
    assert total(at_rest, "asyncsql_tasks_total", task="tests.integration.tasks.async_retry",
                 state="RETRY") == 2  # max_retries=2: two retries, then the failure
    assert total(at_rest, "asyncsql_tasks_total", task="tests.integration.tasks.async_retry",
                 state="FAILURE") == 1
    assert total(at_rest, "asyncsql_tasks_total", task="tests.integration.tasks.async_reject",
                 state="REJECTED") == 1
    assert total(at_rest, "asyncsql_tasks_total", task="tests.integration.tasks.async_add",
                 state="SUCCESS") == 1
    assert total(at_rest, "asyncsql_connection_budget", database="default") == 2


def _backends(worker) -> int:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name "
                                "= %s", (f"{worker.hostname} asyncsql default",)).fetchone()[0])
