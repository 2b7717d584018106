"""Run the ORM example: create and seed the tables, start a worker, activate users.

    python examples/orm/main.py [--users 5]
"""

import argparse
import asyncio
import sys
from pathlib import Path

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import create_async_engine

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from runner import asyncsql_worker  # noqa: E402
from tasks import DATABASE_URL, VAR, Base, Profile, User, activate  # noqa: E402


async def seed(users: int) -> None:
    """Create the tables and ``users`` users, each with a profile (a script's own engine)."""
    engine = create_async_engine(DATABASE_URL)
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(delete(Profile))
        await conn.execute(delete(User))
        await conn.execute(User.__table__.insert(), [
            {"id": i, "name": f"user-{i}", "status": "new"} for i in range(1, users + 1)])
        await conn.execute(Profile.__table__.insert(), [
            {"user_id": i, "logins": 0} for i in range(1, users + 1)])
    await engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=5)
    options = parser.parse_args()
    VAR.mkdir(parents=True, exist_ok=True)  # the SQLite default lives there
    asyncio.run(seed(options.users))
    with asyncsql_worker(HERE, "tasks", VAR):
        results = [activate.delay(i, fail_first_attempt=(i == 1))
                   for i in range(1, options.users + 1)]
        for result in results:
            print(result.get(timeout=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
