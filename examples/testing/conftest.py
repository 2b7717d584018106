"""Create the example's table once per test session, on this process's own loop."""

import asyncio

import pytest
from tasks import VAR, Base, app

from celery_asyncpool import engine, open_databases


async def create_tables() -> None:
    async with open_databases(app):  # engines for this loop, disposed when it exits
        async with engine().begin() as conn:
            await conn.run_sync(Base.metadata.create_all)


@pytest.fixture(scope="session", autouse=True)
def tables() -> None:
    for folder in ("broker", "control", "results"):
        (VAR / folder).mkdir(parents=True, exist_ok=True)
    asyncio.run(create_tables())
