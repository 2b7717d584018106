"""Test async tasks twice: eagerly in this process, and on a real ``-P asyncsql`` worker.

    pytest examples/testing
"""

import asyncio
import uuid

from sqlalchemy import select
from tasks import Note, add_note, app, count_notes

from celery_asyncpool import open_databases, session


def test_apply_runs_the_async_body_in_this_process():
    tag = f"eager-{uuid.uuid4().hex[:8]}"
    result = add_note.apply(args=(tag,))  # no worker: AsyncTask runs it to completion
    assert result.successful(), result.traceback
    assert count_notes.apply(args=(tag,)).get() == 1


def test_a_real_worker_runs_the_tasks(asyncsql_worker):
    tag = f"worker-{uuid.uuid4().hex[:8]}"
    ids = [add_note.delay(f"{tag} {i}").get(timeout=30) for i in range(3)]
    assert count_notes.delay(tag).get(timeout=30) == 3
    assert asyncio.run(stored_texts(ids)) == [f"{tag} {i}" for i in range(3)]
    assert "tasks.add_note" in asyncsql_worker.logs()


async def stored_texts(ids: list[int]) -> list[str]:
    """Read back what the worker wrote, with the tasks' own session() in the test."""
    async with open_databases(app):
        async with session() as s:
            rows = await s.scalars(select(Note.text).where(Note.id.in_(ids)).order_by(Note.id))
            return list(rows)
