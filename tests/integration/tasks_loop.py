"""Tasks that block a child's loop, watch it, or publish from it (``test_loop``)."""

import asyncio
import os
import sys
import time

from .app import app


@app.task
async def block(seconds):
    """Block the child's loop: the watchdog must name this task and this line."""
    time.sleep(seconds)  # blocks the loop
    return os.getpid()


@app.task
async def nap(seconds):
    """Wait on the loop; report the child and when the wait ended."""
    await asyncio.sleep(seconds)
    return {"child": os.getpid(), "end": time.time()}


@app.task
async def timer_lag(seconds, interval_s):
    """The largest lateness of a timer due every ``interval_s``, over ``seconds``."""
    worst = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        due = time.monotonic() + interval_s
        await asyncio.sleep(interval_s)
        worst = max(worst, time.monotonic() - due)
    return {"child": os.getpid(), "max_lag_s": worst}


@app.task
def noop():
    return None


@app.task
async def publish_many(count, queue, pause_s):
    """Publish ``count`` messages to ``queue``, awaiting ``pause_s`` between; the slowest call."""
    slowest = 0.0
    for _ in range(count):
        started = time.monotonic()
        noop.apply_async(queue=queue)
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(pause_s)
    return {"child": os.getpid(), "slowest_s": slowest}


@app.task
async def publish_unreachable(url):
    """Publish through a broker at ``url`` that refuses connections; what the call raised."""
    started = time.monotonic()
    try:
        noop.apply_async(connection=app.connection_for_write(url))
    except Exception as exc:
        return {"error": type(exc).__name__, "blocked_s": time.monotonic() - started}
    return {"error": None, "blocked_s": time.monotonic() - started}


@app.task
async def switch_interval():
    return sys.getswitchinterval()
