"""Plain sync SQLAlchemy with psycopg, the engine (and its pool) built in each child after fork."""

from __future__ import annotations

from celery.signals import worker_process_init, worker_process_shutdown
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from .. import workloads
from ..settings import SYNC_URL
from . import make_app

app = make_app("bench_sync")
_engine: list[Engine] = []


@worker_process_init.connect
def _build_engine(**_: object) -> None:
    _engine[:] = [create_engine(SYNC_URL)]


@worker_process_shutdown.connect
def _dispose_engine(**_: object) -> None:
    for engine in _engine:
        engine.dispose()


def _in_session(work, *args):  # type: ignore[no-untyped-def]
    with Session(_engine[0], expire_on_commit=False) as session:
        return work(session, *args)


@app.task(name="bench.tiny")
def tiny() -> int:
    return _in_session(workloads.tiny_sync)


@app.task(name="bench.orm")
def orm(user_id: int) -> int:
    return _in_session(workloads.orm_sync, user_id)


@app.task(name="bench.io")
def io() -> None:
    _in_session(workloads.io_sync)


@app.task(name="bench.noop")
def noop() -> None:
    return None
