"""Tasks for test_observability: tracing and logging as a user sets them up.

Each child instruments Celery with OpenTelemetry at ``worker_process_init``
and keeps its finished spans in the SDK's ``InMemorySpanExporter``;
``finished_spans`` hands them to the test. The worker formats every log
record, from any logger, with Celery's task formatter (``after_setup_logger``).
"""

import asyncio
import logging
import os

from celery import signals
from celery.app.log import TaskFormatter
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from .app import app

_exporter = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(_exporter))
_tracer = _provider.get_tracer(__name__)
logger = logging.getLogger(__name__)  # a plain stdlib logger, not Celery's task logger


@signals.worker_process_init.connect(weak=False)
def _instrument(**_):
    CeleryInstrumentor().instrument(tracer_provider=_provider)


@signals.after_setup_logger.connect(weak=False)
def _task_ids_in_every_record(logger, **_):
    for handler in logger.handlers:
        handler.setFormatter(TaskFormatter(app.conf.worker_task_log_format))


def _current_span_id():
    return format(trace.get_current_span().get_span_context().span_id, "016x")


def span_record(span):
    """One finished span, JSON-friendly, ids as hex."""
    context, parent = span.get_span_context(), span.parent
    return {
        "name": span.name,
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_id": None if parent is None else format(parent.span_id, "016x"),
        "start": span.start_time,
        "end": span.end_time,
        "attributes": dict(span.attributes or {}),
    }


@app.task(bind=True)
async def traced(self, token, seconds):
    """Open a span of its own between awaits; report the current span id around each await."""
    seen = [_current_span_id()]
    await asyncio.sleep(seconds)
    seen.append(_current_span_id())
    with _tracer.start_as_current_span(f"body-{token}", attributes={"task_id": self.request.id}):
        await asyncio.sleep(seconds)
    seen.append(_current_span_id())
    return seen


@app.task
async def finished_spans():
    """The spans this child has finished so far, and its pid."""
    return {"pid": os.getpid(), "spans": [span_record(s) for s in _exporter.get_finished_spans()]}


@app.task
async def logs_around_awaits(token):
    """Log through a stdlib logger before and after awaits, and from a thread."""
    logger.info("stdlib token=%s before", token)
    await asyncio.sleep(0.1)
    logger.info("stdlib token=%s after", token)
    await asyncio.to_thread(logger.info, "stdlib token=%s thread", token)
