"""Checked by mypy --strict (test_typing), never run: the public API's types, exactly.

A ``# type: ignore[...]`` line is a call mypy must reject: with
``warn_unused_ignores`` (part of --strict) an ignore that is no longer needed,
because a signature became looser, fails the check.
"""

from collections.abc import Callable, Coroutine
from typing import Any, assert_type

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from celery_asyncpool import (AsyncPoolError, AsyncTask, ConfigurationError, NoRuntimeError,
                              TaskPool, engine, on_child_start, on_child_stop, session)


async def uses_the_databases() -> None:
    assert_type(session(), AsyncSession)
    assert_type(session("reports"), AsyncSession)
    assert_type(engine(), AsyncEngine)
    assert_type(engine(name="reports"), AsyncEngine)
    async with session() as s:
        assert_type(s, AsyncSession)
    session(1)  # type: ignore[arg-type]
    engine(None)  # type: ignore[arg-type]


@on_child_start
async def warm_cache() -> None:
    await engine().dispose()


@on_child_stop
async def flush() -> None:
    pass


assert_type(warm_cache, Callable[[], Coroutine[Any, Any, None]])
assert_type(flush, Callable[[], Coroutine[Any, Any, None]])


def sync_hook() -> None:
    pass


async def hook_with_argument(x: int) -> None:
    pass


on_child_start(sync_hook)  # type: ignore[type-var]
on_child_stop(hook_with_argument)  # type: ignore[type-var]

assert_type(AsyncTask, type[AsyncTask])
assert_type(TaskPool, type[TaskPool])
assert_type(TaskPool.limit, int)
assert_type(AsyncTask.abstract, bool)
assert issubclass(NoRuntimeError, AsyncPoolError) and issubclass(ConfigurationError, AsyncPoolError)
