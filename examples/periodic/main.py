"""Run the periodic example: a ``-P asyncsql`` worker and ``celery beat`` side by side.

    python examples/periodic/main.py [--seconds 6]

Creates the table, runs both for ``--seconds``, stops beat then the worker
(warm), and prints the rows the periodic task wrote.
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from runner import asyncsql_worker, celery_beat  # noqa: E402
from tasks import DATABASE_URL, VAR, Base, Heartbeat  # noqa: E402


async def create_table() -> None:
    engine = create_async_engine(DATABASE_URL)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    await engine.dispose()


async def heartbeats() -> list[Heartbeat]:
    engine = create_async_engine(DATABASE_URL)
    async with engine.connect() as conn:
        rows = (await conn.execute(select(Heartbeat).order_by(Heartbeat.id))).all()
    await engine.dispose()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6)
    options = parser.parse_args()
    VAR.mkdir(parents=True, exist_ok=True)  # the SQLite default lives there
    for old in VAR.glob("beat-schedule*"):  # start the schedule afresh
        old.unlink()
    asyncio.run(create_table())
    with asyncsql_worker(HERE, "tasks", VAR):
        with celery_beat(HERE, "tasks", VAR):
            time.sleep(options.seconds)
        time.sleep(1)  # the worker fetches the last run beat sent
    rows = asyncio.run(heartbeats())
    for row in rows:
        print(f"{row.ran_at:%H:%M:%S.%f} child {row.child_pid} task {row.task_id}")
    print(f"{len(rows)} heartbeats written in {options.seconds:g} s; beat log: {VAR / 'beat.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
