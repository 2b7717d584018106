"""Sync jobs in a child: one at a time, on a thread of their own, never on the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from .. import _compat

# What Celery's tracer returns: (0, repr of the result, runtime) or (1, einfo, runtime).
Outcome = Any


class SyncThread:
    """Runs sync jobs one at a time on a thread of its own, never on the loop.

    A soft time limit is raised there as ``SoftTimeLimitExceeded`` between two
    Python instructions: a blocking call (``time.sleep``, a socket read)
    delays it until the call returns.
    """

    def __init__(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="asyncsql-sync")
        self._lock = threading.Lock()
        self._running: tuple[int, int] | None = None  # (job id, thread id)

    async def run(self, job_id: int, call: Callable[[], Outcome],
                  on_start: Callable[[int, float], object]) -> Outcome:
        """Run ``call`` there once the jobs before it are done, calling ``on_start`` first.

        ``on_start(job_id, time.monotonic())`` is called on that thread.
        """
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, job_id, call, on_start)

    def _call(self, job_id: int, call: Callable[[], Outcome],
              on_start: Callable[[int, float], object]) -> Outcome:
        thread_id = threading.get_ident()
        with self._lock:
            self._running = (job_id, thread_id)
        try:
            on_start(job_id, time.monotonic())
            return call()
        finally:
            with self._lock:
                self._running = None
                # A soft limit that came after the tracer returned.
                _compat.set_async_exc(thread_id, None)

    def interrupt(self, job_id: int) -> bool:
        """Raise ``SoftTimeLimitExceeded`` in job ``job_id`` if it runs now; whether it does."""
        with self._lock:
            if self._running is None or self._running[0] != job_id:
                return False
            return _compat.set_async_exc(self._running[1], SoftTimeLimitExceeded)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
