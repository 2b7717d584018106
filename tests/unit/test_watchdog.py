"""The loop watchdog on a real loop in this thread: blocked, idle, stopped."""

import asyncio
import logging
import threading
import time

import pytest

from celery_asyncpool.child.watchdog import Watchdog

WARNING = "has not run for"


def _run(threshold_s, main, describe=lambda task: f"described {task.get_name()}"):
    """Run ``main()`` on a new loop watched by a watchdog; the watchdog, once stopped."""
    loop = asyncio.new_event_loop()

    async def watched():
        watchdog = Watchdog(loop, threshold_s, describe)
        watchdog.start()
        try:
            await loop.create_task(main(), name="the-blocker")
        finally:
            watchdog.stop()
        return watchdog

    try:
        return loop.run_until_complete(watched())
    finally:
        loop.close()


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.message]


def test_a_blocked_loop_gets_one_warning_naming_the_task_and_the_blocking_line(caplog):
    async def blocker():
        time.sleep(0.6)  # the blocking line
        await asyncio.sleep(0.1)  # the loop ticks again: the episode ends

    caplog.set_level(logging.INFO, logger="celery_asyncpool.child.watchdog")
    _run(0.1, blocker)
    [warning] = _warnings(caplog)
    assert "described the-blocker" in warning.message
    assert "time.sleep(0.6)  # the blocking line" in warning.message
    assert "in blocker" in warning.message
    assert any("runs again after being blocked" in r.message for r in caplog.records)


def test_each_blocking_episode_gets_its_own_warning(caplog):
    async def blocker():
        for _ in range(2):
            time.sleep(0.4)
            await asyncio.sleep(0.1)

    caplog.set_level(logging.WARNING, logger="celery_asyncpool.child.watchdog")
    _run(0.1, blocker)
    assert len(_warnings(caplog)) == 2


def test_an_idle_or_busy_but_yielding_loop_gets_no_warning(caplog):
    async def yielding():
        deadline = time.monotonic() + 0.6
        while time.monotonic() < deadline:
            await asyncio.sleep(0)  # busy, but never longer than a step
        await asyncio.sleep(0.6)  # idle

    caplog.set_level(logging.WARNING, logger="celery_asyncpool.child.watchdog")
    _run(0.1, yielding)
    assert _warnings(caplog) == []


def test_stop_ends_the_thread_and_the_heartbeat():
    async def nothing():
        pass

    before = set(threading.enumerate())
    watchdog = _run(0.1, nothing)
    assert not watchdog._thread.is_alive()
    assert watchdog._timer.cancelled()
    assert set(threading.enumerate()) <= before


def test_a_failing_description_does_not_kill_the_watchdog(caplog):
    def broken(task):
        raise RuntimeError("no description")

    async def blocker():
        for _ in range(2):
            time.sleep(0.4)
            await asyncio.sleep(0.1)

    caplog.set_level(logging.ERROR, logger="celery_asyncpool.child.watchdog")
    _run(0.1, blocker, describe=broken)
    failures = [r for r in caplog.records if "failed to check" in r.message]
    assert len(failures) == 2


def test_overdue_counts_from_the_heartbeat_due_time():
    loop = asyncio.new_event_loop()
    try:
        watchdog = Watchdog(loop, 1.0, lambda task: "")
        watchdog._beat = 100.0
        assert watchdog.overdue_s(100.2) == 0.0  # the next beat is due at 100.25
        assert watchdog.overdue_s(101.75) == pytest.approx(1.5)
    finally:
        loop.close()
