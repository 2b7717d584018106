"""Tasks for the Redis broker transport's tests, and the kill that shows its loss window.

With ``ITEST_KILL_ON_DELIVER=1`` the worker's main process SIGKILLs itself
the moment its transport hands the first message to the consumer: after the
message left the queue (stock kombu: ``BRPOP``; ours: the fetch script), before
Celery sees it. What Redis holds then is what a crash there leaves.
"""

import os
import signal

from kombu.transport.virtual import base

from .app import app

if os.environ.get("ITEST_KILL_ON_DELIVER") == "1":
    def _killed_on_deliver(self, message, queue):
        os.kill(os.getpid(), signal.SIGKILL)

    base.Transport._deliver = _killed_on_deliver


@app.task
def sync_echo(value):
    return value


@app.task
async def async_echo(value):
    return value


@app.task
async def async_nap(seconds, value):
    import asyncio

    await asyncio.sleep(seconds)
    return value
