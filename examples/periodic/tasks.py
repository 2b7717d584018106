"""A periodic ``async def`` task: ``celery beat`` sends it each second, ``-P asyncsql`` runs it.

Beat only publishes messages; the task runs on a worker child's loop and
engine like any other. Same defaults as the quickstart (no server needed);
PERIODIC_DATABASE_URL, PERIODIC_BROKER and PERIODIC_BACKEND point it at
PostgreSQL and Redis.
"""

import os
from datetime import datetime, timezone
from pathlib import Path

from celery import Celery
from sqlalchemy import DateTime, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from celery_asyncpool import session

VAR = Path(os.environ.get("PERIODIC_VAR", Path(__file__).parent / "var")).resolve()
DATABASE_URL = os.environ.get("PERIODIC_DATABASE_URL",
                              f"sqlite+aiosqlite:///{VAR / 'periodic.db'}")

app = Celery("periodic")
app.conf.update(
    broker_url=os.environ.get("PERIODIC_BROKER", "filesystem://"),
    broker_transport_options={"data_folder_in": str(VAR / "broker"),
                              "data_folder_out": str(VAR / "broker"),
                              "control_folder": str(VAR / "control")},
    result_backend=os.environ.get("PERIODIC_BACKEND", f"file://{VAR / 'results'}"),
    asyncsql_database_url=DATABASE_URL,
    beat_schedule={
        "heartbeat-every-second": {"task": "tasks.record_heartbeat", "schedule": 1.0},
    },
)


class Base(DeclarativeBase):
    pass


class Heartbeat(Base):
    __tablename__ = "periodic_heartbeats"
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[str] = mapped_column(String(36), unique=True)
    ran_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    child_pid: Mapped[int]


@app.task(bind=True, ignore_result=True)
async def record_heartbeat(self) -> None:
    """Store which run this is, when it ran and in which worker child."""
    async with session() as s, s.begin():
        s.add(Heartbeat(task_id=self.request.id, ran_at=datetime.now(timezone.utc),
                        child_pid=os.getpid()))
