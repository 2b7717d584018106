"""The ORM example: a ``User`` with a ``profile``, loaded, updated and committed in an async task.

Same defaults as the quickstart (no server needed); ORM_DATABASE_URL,
ORM_BROKER and ORM_BACKEND point it at PostgreSQL and Redis.
"""

import os
from pathlib import Path

from celery import Celery
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from celery_asyncpool import session

VAR = Path(os.environ.get("ORM_VAR", Path(__file__).parent / "var")).resolve()
DATABASE_URL = os.environ.get("ORM_DATABASE_URL", f"sqlite+aiosqlite:///{VAR / 'orm.db'}")

app = Celery("orm")
app.conf.update(
    broker_url=os.environ.get("ORM_BROKER", "filesystem://"),
    broker_transport_options={"data_folder_in": str(VAR / "broker"),
                              "data_folder_out": str(VAR / "broker"),
                              "control_folder": str(VAR / "control")},
    result_backend=os.environ.get("ORM_BACKEND", f"file://{VAR / 'results'}"),
    asyncsql_database_url=DATABASE_URL,
    asyncsql_engine_options={"pool_pre_ping": True},
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "orm_users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    status: Mapped[str] = mapped_column(String(20), default="new")
    profile: Mapped["Profile"] = relationship(back_populates="user")


class Profile(Base):
    __tablename__ = "orm_profiles"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("orm_users.id"), unique=True)
    logins: Mapped[int] = mapped_column(default=0)
    user: Mapped[User] = relationship(back_populates="profile")


@app.task(bind=True, autoretry_for=(DBAPIError,), max_retries=3, retry_backoff=0.1)
async def activate(self, user_id: int, fail_first_attempt: bool = False) -> dict:
    """Activate a user and count a login; a database error rolls back and retries.

    ``fail_first_attempt`` breaks a unique constraint after the update on the
    first try: the transaction is rolled back, so the retry starts clean.
    """
    async with session() as s, s.begin():  # commit on success, roll back on error
        user = (await s.execute(
            select(User).options(selectinload(User.profile)).where(User.id == user_id)
        )).scalar_one()
        user.status = "active"
        user.profile.logins += 1
        if fail_first_attempt and self.request.retries == 0:
            s.add(Profile(user_id=user_id))  # a second profile: IntegrityError at flush
            await s.flush()
    return {"user": user.name, "status": user.status, "logins": user.profile.logins,
            "attempts": self.request.retries + 1}
