"""What monitoring sees of an asyncsql worker: spans and log records per concurrent task."""

import json
import os
import re
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from contextlib import contextmanager

import pytest
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from . import tasks_observability, tasks_slots
from .app import app
from .conftest import ROOT, eventually, run_worker

OTEL_INCLUDE = "tests.integration.tasks,tests.integration.tasks_observability"
SLOTS_INCLUDE = "tests.integration.tasks,tests.integration.tasks_slots"
TASKS = 16


@contextmanager
def instrumented_publisher():
    """Celery instrumented in this process too, so each published task carries its trace."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield provider.get_tracer(__name__), exporter
    finally:
        instrumentor.uninstrument()


def by_task_id(spans, name):
    """The spans whose name is (or, ending in '-', starts with) ``name``, by their task id."""
    found = {}
    for span in spans:
        if span["name"] == name or (name.endswith("-") and span["name"].startswith(name)):
            task_id = span["attributes"].get("messaging.message.id",
                                             span["attributes"].get("task_id"))
            assert task_id not in found, f"two {name} spans for task {task_id}"
            found[task_id] = span
    return found


@pytest.fixture(scope="module")
def otel_worker(tmp_path_factory):
    """One child with 8 slots: the traced tasks interleave on one loop."""
    with run_worker(tmp_path_factory.mktemp("otel"), concurrency=8, include=OTEL_INCLUDE,
                    conf={"asyncsql_processes": 1}) as started:
        yield started


def test_each_concurrent_task_gets_its_own_span_with_the_right_parents(otel_worker):
    """16 tasks, 8 at a time in one child, under opentelemetry-instrumentation-celery: each
    gets one run span, child of its publish span in the caller's trace; inside the body
    the current span is that run span before and after awaits, and a span the body opens
    is the run span's child."""
    with instrumented_publisher() as (tracer, published):
        with tracer.start_as_current_span("caller") as caller:
            results = {otel_worker.send(tasks_observability.traced, token, 0.2).id: token
                       for token in range(TASKS)}
    outcomes = {task_id: app.AsyncResult(task_id).get(timeout=60) for task_id in results}
    worker_spans = otel_worker.send(tasks_observability.finished_spans).get(timeout=30)["spans"]

    trace_id = format(caller.get_span_context().trace_id, "032x")
    publishes = by_task_id([tasks_observability.span_record(s) for s in published.get_finished_spans()],
                           f"apply_async/{tasks_observability.traced.name}")
    runs = by_task_id(worker_spans, f"run/{tasks_observability.traced.name}")
    bodies = by_task_id(worker_spans, "body-")
    assert set(publishes) == set(runs) == set(results)
    for task_id, token in results.items():
        run = runs[task_id]
        assert run["trace_id"] == trace_id
        assert run["parent_id"] == publishes[task_id]["span_id"]
        assert outcomes[task_id] == [run["span_id"]] * 3, task_id
        body = bodies[task_id]
        assert body["name"] == f"body-{token}"
        assert body["parent_id"] == run["span_id"]
        assert body["trace_id"] == trace_id
    assert max_overlap(runs.values()) > 1, "the traced tasks did not run concurrently"


def max_overlap(spans):
    """Most spans open at one instant."""
    edges = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans])
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def test_stdlib_log_records_name_their_own_task_under_concurrency(otel_worker):
    """With Celery's task formatter on the worker's handlers, records of a plain
    logging.getLogger(__name__) logger name their own task, before and after awaits and in
    asyncio.to_thread, while 8 tasks interleave in one child."""
    task = tasks_observability.logs_around_awaits
    results = {token: otel_worker.send(task, token) for token in range(TASKS)}
    for result in results.values():
        result.get(timeout=60)
    pattern = re.compile(rf"{re.escape(task.name)}\[([0-9a-f-]{{36}})\]: stdlib token=(\d+) (\w+)")
    logged = {}
    for task_id, token, step in pattern.findall(otel_worker.logs()):
        logged.setdefault(int(token), []).append((task_id, step))
    assert logged == {token: [(result.id, "before"), (result.id, "after"), (result.id, "thread")]
                      for token, result in results.items()}


@contextmanager
def run_flower(tmp_path):
    """A real ``celery flower`` process for the integration app, on a free local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "flower.log"
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "FLOWER_UNAUTHENTICATED_API": "1"}
    command = [sys.executable, "-m", "celery", "-A", "tests.integration.app", "flower",
               "--address=127.0.0.1", f"--port={port}", "--inspect_timeout=5000"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def flower_worker(base_url, proc, log_path, hostname):
    """What Flower's HTTP API reports of ``hostname`` after asking it afresh; None until it can."""
    if proc.poll() is not None:
        raise AssertionError(f"flower exited ({proc.returncode}):\n{log_path.read_text()}")
    url = f"{base_url}/api/workers?refresh=1&workername={urllib.parse.quote(hostname)}"
    try:
        with urllib.request.urlopen(url, timeout=15) as response:
            return json.loads(response.read())[hostname]
    except (OSError, KeyError):  # not listening yet, or the worker not answered yet
        return None


def test_flower_shows_the_pool_while_tasks_run(tmp_path):
    """Flower's /api/workers (which runs `inspect stats`) shows, while 4 tasks each hold a
    database connection on -c 4 over 2 children: the children's pids, the slot counts, 2
    tasks in flight in each child and 2 of its pooled connections checked out."""
    with run_worker(tmp_path, concurrency=4, include=SLOTS_INCLUDE,
                    conf={"asyncsql_processes": 2}) as worker, \
            run_flower(tmp_path) as flower:
        children = worker.wait_for_children(2)
        running = [worker.send(tasks_slots.db_span, 20) for _ in range(4)]

        def busy():
            info = flower_worker(*flower, worker.hostname)
            pool = (info or {}).get("stats", {}).get("pool", {})
            per_child = pool.get("asyncsql", {}).get("children", [])
            loaded = [c for c in per_child if c["in-flight"] == 2
                      and c["engines"].get("default", {}).get("checked_out") == 2]
            return pool if len(loaded) == 2 else None

        pool = eventually(busy, timeout_s=60, what="Flower to show both children busy")
        for result in running:
            result.revoke(terminate=True)
    assert pool["max-concurrency"] == 4
    assert sorted(pool["processes"]) == children
    asyncsql = pool["asyncsql"]
    assert asyncsql["processes"] == 2
    assert asyncsql["slots-per-process"] == 2
    assert asyncsql["in-flight"] == 4
    assert asyncsql["connection-budget"] == {"default": 4}
    assert sorted(c["pid"] for c in asyncsql["children"]) == children
    for child in asyncsql["children"]:
        assert child["slots"] == 2
        assert child["draining"] is False
        assert child["engines"]["default"] == {"size": 2, "checked_out": 2, "checked_in": 0,
                                               "overflow": 0, "waiters": 0}
    assert asyncsql["connections"] == {"default": 4}
