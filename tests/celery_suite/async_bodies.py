"""Celery's integration-suite tasks as ``AsyncTask``\\ s, for the async-body pass.

Imported by the suite's session worker (``celery_includes``, see ``plugin.py``).
When that worker initialises, each task of ``t.integration.tasks`` in its app is
replaced, under its own name, by a subclass of ``AsyncTask`` and of the task's
own class (so its options stay: retries, autoretry, time limits, acks...)
whose ``async def`` body awaits the original body on an executor thread. The
result, retry, reject and request-context paths the suite checks are then
those of an async task on ``-P asyncsql``; the original body keeps its
request (the context, and so ``self.request``, goes with it to the thread).

The executor has a thread per slot of the worker: bodies that wait for other
tasks (joins, chords) hold theirs, and asyncio's default executor (six
threads on two cores) would deadlock them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
import os
from typing import Any

from celery import Task, signals

from celery_asyncpool import AsyncTask
from tests.celery_suite.plugin import CONCURRENCY

SUITE_TASKS = "t.integration.tasks"

_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _threads() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=CONCURRENCY, thread_name_prefix="suite-async-body")
    return _executor


def _forget_threads() -> None:
    global _executor
    _executor = None


os.register_at_fork(after_in_child=_forget_threads)


def as_async(task: Task) -> type[Task]:
    """A subclass of ``task``'s class, and of ``AsyncTask``, whose body awaits the original."""
    cls = type(task)
    original = inspect.getattr_static(cls, "run")
    bound = not isinstance(original, staticmethod)
    body = original if bound else original.__func__

    async def run(self: Task, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(body, self, *args, **kwargs) if bound else \
            functools.partial(body, *args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_threads(), contextvars.copy_context().run, call)

    run.__name__ = run.__qualname__ = getattr(body, "__name__", "run")
    # Task.retry(args=...) reads the body's parameters off inspect.signature(self.run).
    signature = inspect.signature(body)
    if not bound:
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        signature = signature.replace(parameters=[self_parameter,
                                                  *signature.parameters.values()])
    run.__signature__ = signature  # type: ignore[attr-defined]
    return type(cls.__name__, (AsyncTask, cls), {"run": run, "__module__": cls.__module__})


@signals.worker_init.connect(weak=False)
def _make_bodies_async(sender: Any = None, **_: Any) -> None:
    app = sender.app
    for name, task in list(app.tasks.items()):
        if type(task).__module__ == SUITE_TASKS and not isinstance(task, AsyncTask):
            app.register_task(as_async(task)())
