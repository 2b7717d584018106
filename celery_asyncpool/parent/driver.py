"""Readers, writers and timers for the supervisor where the worker's kombu hub is not running.

A worker on a transport without async support (kombu's filesystem transport)
has no hub, and during a warm shutdown the hub has stopped: ``LoopDriver``
then watches the children's pipes, either on a thread of its own
(``start_thread``) or in the calling thread (``run_until``).
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import Any

Callback = Callable[..., Any]


class Timer:
    def __init__(self, when: float, callback: Callback, args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class LoopDriver:
    """The subset of kombu's ``Hub`` the supervisor uses, on a selector of its own.

    Every callback runs holding ``lock``; code on other threads that touches
    the supervisor takes the same lock.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._selector = selectors.DefaultSelector()
        self._callbacks: dict[tuple[int, int], tuple[Callback, tuple[Any, ...]]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.on_tick: Callback | None = None

    def add_reader(self, fd: int, callback: Callback, *args: Any) -> None:
        self._watch(fd, selectors.EVENT_READ, callback, args)

    def add_writer(self, fd: int, callback: Callback, *args: Any) -> None:
        self._watch(fd, selectors.EVENT_WRITE, callback, args)

    def remove_reader(self, fd: int) -> None:
        self._unwatch(fd, selectors.EVENT_READ)

    def remove_writer(self, fd: int) -> None:
        self._unwatch(fd, selectors.EVENT_WRITE)

    def call_later(self, delay: float, callback: Callback, *args: Any) -> Timer:
        with self.lock:
            timer = Timer(time.monotonic() + delay, callback, args)
            heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        self._wake()
        return timer

    def _watch(self, fd: int, event: int, callback: Callback, args: tuple[Any, ...]) -> None:
        with self.lock:
            self._callbacks[(fd, event)] = (callback, args)
            self._reregister(fd)
        self._wake()

    def _unwatch(self, fd: int, event: int) -> None:
        with self.lock:
            self._callbacks.pop((fd, event), None)
            self._reregister(fd)

    def _reregister(self, fd: int) -> None:
        events = sum(e for (f, e) in self._callbacks if f == fd)
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass
        if events:
            self._selector.register(fd, events)

    def _wake(self) -> None:
        if self._thread is not None and threading.current_thread() is not self._thread:
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass

    def run_until(self, done: Callable[[], bool], timeout_s: float | None = None,
                  tick_s: float = 0.5) -> bool:
        """Serve callbacks and timers until ``done()``; False if ``timeout_s`` passed first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self.lock:
                if done():
                    return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            wait = min(tick_s, self._next_timer(now) - now)
            if deadline is not None:
                wait = min(wait, deadline - now)
            ready = self._selector.select(max(0.0, wait))
            with self.lock:
                for key, events in ready:
                    self._dispatch(key.fd, events)
                self._fire_timers()
                if self.on_tick is not None:
                    self.on_tick()

    def _dispatch(self, fd: int, events: int) -> None:
        if fd == self._wake_r:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            return
        for event in (selectors.EVENT_READ, selectors.EVENT_WRITE):
            if events & event and (fd, event) in self._callbacks:
                callback, args = self._callbacks[(fd, event)]
                callback(*args)

    def _next_timer(self, now: float) -> float:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else now + 3600

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback(*timer.args)

    def start_thread(self, tick_s: float = 0.5) -> None:
        """Serve on a thread of its own until ``stop_thread``, waking at least every ``tick_s``."""
        self._thread = threading.Thread(target=self.run_until, args=(lambda: self._stopping,),
                                        kwargs={"tick_s": tick_s}, name="asyncsql-supervisor",
                                        daemon=True)
        self._thread.start()

    def stop_thread(self) -> None:
        self._stopping = True
        if self._thread is not None:
            os.write(self._wake_w, b"\0")
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
