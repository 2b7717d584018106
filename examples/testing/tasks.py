"""The testing example's tasks: notes stored by async tasks, tested with the pytest plugin.

Same defaults as the quickstart (no server needed): SQLite, kombu's filesystem
broker and a file result backend under ``./var``. TESTING_DATABASE_URL,
TESTING_BROKER and TESTING_BACKEND point it at PostgreSQL and Redis.
"""

import os
from pathlib import Path

from celery import Celery
from sqlalchemy import String, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_asyncpool import session

VAR = Path(os.environ.get("TESTING_VAR", Path(__file__).parent / "var")).resolve()

# task_cls=AsyncTask: task.apply() and eager mode run the async bodies too.
app = Celery("testing_example", task_cls="celery_asyncpool:AsyncTask")
app.conf.update(
    broker_url=os.environ.get("TESTING_BROKER", "filesystem://"),
    broker_transport_options={"data_folder_in": str(VAR / "broker"),
                              "data_folder_out": str(VAR / "broker"),
                              "control_folder": str(VAR / "control")},
    result_backend=os.environ.get("TESTING_BACKEND", f"file://{VAR / 'results'}"),
    task_default_queue=os.environ.get("TESTING_QUEUE", "testing-example"),  # the worker's too
    asyncsql_database_url=os.environ.get("TESTING_DATABASE_URL",
                                         f"sqlite+aiosqlite:///{VAR / 'testing.db'}"),
)


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "testing_notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


@app.task
async def add_note(text: str) -> int:
    """Store a note; return its id."""
    async with session() as s, s.begin():
        note = Note(text=text)
        s.add(note)
        await s.flush()
    return note.id


@app.task
async def count_notes(prefix: str) -> int:
    """How many notes start with ``prefix``."""
    async with session() as s:
        return (await s.execute(
            select(func.count()).where(Note.text.startswith(prefix)))).scalar_one()
