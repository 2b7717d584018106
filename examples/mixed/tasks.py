"""A mixed worker: sync and async tasks in one app, served by one ``-P asyncsql`` worker.

- ``checksum`` is a plain ``def``: it runs on its child's sync thread, never on
  the event loop, one at a time per child;
- ``store_checksum`` is ``async def``: it runs on the child's loop, many at once,
  through ``session()``;
- ``count_checksums`` is existing sync code with its own sync engine, built at
  import: each child gets a fresh pool of it after fork, without any call.

Same defaults as the quickstart (no server needed); MIXED_DATABASE_URL,
MIXED_BROKER and MIXED_BACKEND point it at PostgreSQL and Redis.
"""

import hashlib
import os
import threading
from pathlib import Path

from celery import Celery
from sqlalchemy import String, create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from celery_asyncpool import session

VAR = Path(os.environ.get("MIXED_VAR", Path(__file__).parent / "var")).resolve()
DATABASE_URL = os.environ.get("MIXED_DATABASE_URL", f"sqlite+aiosqlite:///{VAR / 'mixed.db'}")
SYNC_DRIVERS = {"sqlite+aiosqlite": "sqlite", "postgresql+asyncpg": "postgresql+psycopg"}

app = Celery("mixed", task_cls="celery_asyncpool:AsyncTask")
app.conf.update(
    broker_url=os.environ.get("MIXED_BROKER", "filesystem://"),
    broker_transport_options={"data_folder_in": str(VAR / "broker"),
                              "data_folder_out": str(VAR / "broker"),
                              "control_folder": str(VAR / "control")},
    result_backend=os.environ.get("MIXED_BACKEND", f"file://{VAR / 'results'}"),
    asyncsql_database_url=DATABASE_URL,
)

# The sync code's own engine, as an existing project has it (psycopg for PostgreSQL).
url = make_url(DATABASE_URL)
sync_engine = create_engine(url.set(drivername=SYNC_DRIVERS[url.drivername]))


class Base(DeclarativeBase):
    pass


class Checksum(Base):
    __tablename__ = "mixed_checksums"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    sha256: Mapped[str] = mapped_column(String(64))


@app.task
def checksum(text: str) -> str:
    """CPU work in a sync task: it holds no event loop, so no coroutine waits on it."""
    return hashlib.sha256(text.encode()).hexdigest()


@app.task
async def store_checksum(sha256: str, name: str) -> dict:
    """Database work in an async task, on the child's loop and pooled engine."""
    async with session() as s, s.begin():
        s.add(Checksum(name=name, sha256=sha256))
    return {"name": name, "sha256": sha256[:12], "thread": threading.current_thread().name}


@app.task
def count_checksums() -> dict:
    """Existing sync SQLAlchemy code keeps working unchanged."""
    with Session(sync_engine) as s:
        rows = s.scalar(select(func.count(Checksum.id)))
    return {"rows": rows, "thread": threading.current_thread().name}
