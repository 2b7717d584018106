"""Tasks for the web side: results awaited with ``aget``, rows sent on commit."""

from sqlalchemy import text

from celery_asyncpool import session
from celery_asyncpool.awaiting import aget

from .app import app
from .tasks import async_add

TABLE = "web_side_rows"


@app.task
async def row_exists(row_id: int) -> bool:
    """Whether the row the sender committed is there when the task runs."""
    async with session() as s:
        found = await s.execute(text(f"SELECT 1 FROM {TABLE} WHERE id = :id"), {"id": row_id})
        return found.scalar() is not None


@app.task
async def awaits_a_subtask(allowed: bool = False) -> int:
    """Awaits another task's result from inside a task: refused unless allowed."""
    return int(await aget(async_add.apply_async((1, 2)), timeout=30,
                          disable_sync_subtasks=not allowed))
