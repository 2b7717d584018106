"""The ``orm`` workload's tables: users, each with a profile, seeded once per run."""

from __future__ import annotations

from sqlalchemy import ForeignKey, create_engine, insert, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "bench_users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    visits: Mapped[int] = mapped_column(default=0)
    profile: Mapped[Profile] = relationship(back_populates="user")


class Profile(Base):
    __tablename__ = "bench_profiles"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("bench_users.id"), unique=True)
    bio: Mapped[str]
    user: Mapped[User] = relationship(back_populates="profile")


def prepare_database(sync_url: str, users: int) -> None:
    """Create the benchmark's database if missing, then (re)seed ``users`` users and profiles."""
    server_url, _, name = sync_url.rpartition("/")
    admin = create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        exists = connection.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}).first()
        if not exists:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    engine = create_engine(sync_url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(insert(User), [
            {"id": i, "name": f"user {i}", "visits": 0} for i in range(1, users + 1)])
        connection.execute(insert(Profile), [
            {"id": i, "user_id": i, "bio": f"bio of user {i}"} for i in range(1, users + 1)])
    engine.dispose()
