"""The work each task does, once async (``AsyncSession``) and once sync (``Session``).

Every scenario runs the same statements; only how the task reaches the
database differs.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, selectinload

from .models import User

TINY = text("SELECT 1")
IO = text("SELECT pg_sleep(0.02)")


def _user(user_id: int):  # type: ignore[no-untyped-def]
    return select(User).where(User.id == user_id).options(selectinload(User.profile))


async def tiny(session: AsyncSession) -> int:
    return (await session.execute(TINY)).scalar_one()  # type: ignore[no-any-return]


async def orm(session: AsyncSession, user_id: int) -> int:
    user = (await session.execute(_user(user_id))).scalar_one()
    user.visits += 1
    visits = user.visits + len(user.profile.bio)
    await session.commit()
    return visits


async def io(session: AsyncSession) -> None:
    await session.execute(IO)


def tiny_sync(session: Session) -> int:
    return session.execute(TINY).scalar_one()  # type: ignore[no-any-return]


def orm_sync(session: Session, user_id: int) -> int:
    user = session.execute(_user(user_id)).scalar_one()
    user.visits += 1
    visits = user.visits + len(user.profile.bio)
    session.commit()
    return visits


def io_sync(session: Session) -> None:
    session.execute(IO)


def summary(samples: list[float]) -> dict[str, float]:
    """Median, 99th percentile and maximum of ``samples``, and their count."""
    ordered = sorted(samples)
    return {"n": len(ordered), "p50": statistics.median(ordered),
            "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
            "max": ordered[-1]}


async def timer_lags(seconds: float, interval_s: float) -> dict[str, float]:
    """How late the running loop wakes a timer due every ``interval_s``, for ``seconds``."""
    lags = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        due = time.monotonic() + interval_s
        await asyncio.sleep(interval_s)
        lags.append(time.monotonic() - due)
    return summary(lags)
