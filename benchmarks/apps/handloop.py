"""The best a user can do today without this package: a loop and a pooled engine per child, by hand.

A ``worker_process_init`` handler builds them after fork; each sync task
drives its coroutine with ``loop.run_until_complete`` on the child's main thread.
"""

from __future__ import annotations

import asyncio

from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from .. import workloads
from ..settings import ASYNC_URL
from . import make_app

app = make_app("bench_handloop")
_state: dict[str, object] = {}


@worker_process_init.connect
def _build_loop_and_engine(**_: object) -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _state["loop"] = loop
    _state["engine"] = create_async_engine(ASYNC_URL)


@worker_process_shutdown.connect
def _dispose(**_: object) -> None:
    engine = _state.get("engine")
    if isinstance(engine, AsyncEngine):
        _run(engine.dispose())


def _run(coro):  # type: ignore[no-untyped-def]
    loop: asyncio.AbstractEventLoop = _state["loop"]  # type: ignore[assignment]
    return loop.run_until_complete(coro)


async def _in_session(work, *args):  # type: ignore[no-untyped-def]
    async with AsyncSession(_state["engine"], expire_on_commit=False) as session:
        return await work(session, *args)


@app.task(name="bench.tiny")
def tiny() -> int:
    return _run(_in_session(workloads.tiny))


@app.task(name="bench.orm")
def orm(user_id: int) -> int:
    return _run(_in_session(workloads.orm, user_id))


@app.task(name="bench.io")
def io() -> None:
    _run(_in_session(workloads.io))


@app.task(name="bench.noop")
def noop() -> None:
    return None
