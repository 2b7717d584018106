"""The quickstart: async tasks doing real database work on ``-P asyncsql``.

With no settings it needs no server: SQLite through aiosqlite, kombu's
filesystem broker and a file result backend, all under ``./var``. Point it at
real servers with QUICKSTART_DATABASE_URL (e.g.
``postgresql+asyncpg://postgres@127.0.0.1/test``) and QUICKSTART_BROKER /
QUICKSTART_BACKEND (e.g. ``redis://127.0.0.1:6379/0``).
"""

import os
from pathlib import Path

from celery import Celery
from sqlalchemy import text

from celery_asyncpool import on_child_start, session

VAR = Path(os.environ.get("QUICKSTART_VAR", Path(__file__).parent / "var")).resolve()
BROKER_FOLDER = VAR / "broker"

app = Celery("quickstart")
app.conf.update(
    broker_url=os.environ.get("QUICKSTART_BROKER", "filesystem://"),
    broker_transport_options={"data_folder_in": str(BROKER_FOLDER),
                              "data_folder_out": str(BROKER_FOLDER),
                              "control_folder": str(VAR / "control")},
    result_backend=os.environ.get("QUICKSTART_BACKEND", f"file://{VAR / 'results'}"),
    worker_pool="asyncsql",
    asyncsql_database_url=os.environ.get("QUICKSTART_DATABASE_URL",
                                         f"sqlite+aiosqlite:///{VAR / 'quickstart.db'}"),
)


@on_child_start
async def create_table() -> None:
    """Each child makes sure the table exists, on its own loop and engine."""
    async with session() as s:
        await s.execute(text("CREATE TABLE IF NOT EXISTS visits (name VARCHAR(80) NOT NULL)"))
        await s.commit()


@app.task
async def record_visit(name: str) -> dict:
    """Insert a row and count the visits so far, in one transaction."""
    async with session() as s:
        await s.execute(text("INSERT INTO visits (name) VALUES (:name)"), {"name": name})
        count = (await s.execute(text("SELECT count(*) FROM visits WHERE name = :name"),
                                 {"name": name})).scalar_one()
        await s.commit()
    return {"name": name, "visits": count, "child": os.getpid()}
