"""A watchdog for a child's event loop: warns, with a stack, when code blocks the loop.

Every coroutine of a child shares its loop, so one that calls blocking code
(``time.sleep``, a sync driver, a CPU-bound loop) stalls all its siblings.
The loop stamps a heartbeat from a timer; a daemon thread checks the stamp.
When the loop is overdue by more than the threshold, the thread logs one
WARNING for that episode, naming what runs on the loop and showing the loop
thread's stack (``sys._current_frames``), and one INFO once the loop ticks
again. Nothing runs per task or per step: the loop's only cost is one timer
callback every quarter threshold, which also keeps an idle loop ticking.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from .. import _compat

logger = logging.getLogger(__name__)

# What the loop runs, described for the warning; given the asyncio Task running (or None).
Describe = Callable[["asyncio.Task[Any] | None"], str]
# Told, from the watchdog's thread, when an episode starts (True) and ends (False).
OnEpisode = Callable[[bool], None]

_LOOP_CALLBACK_CODE = _compat.loop_callback_code()  # every callback and Task step
BEATS_PER_THRESHOLD = 4
JOIN_TIMEOUT_S = 1.0


class Watchdog:
    """Watches ``loop`` from a thread of its own; start and stop it on the loop's thread.

    Invariant: at most one WARNING between two heartbeats, so a loop blocked
    for a minute logs once, not every interval.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold_s: float,
                 describe: Describe, on_episode: OnEpisode | None = None) -> None:
        self.threshold_s = threshold_s
        self._on_episode = on_episode
        self.interval_s = threshold_s / BEATS_PER_THRESHOLD
        self._loop = loop
        self._describe = describe
        self._beat = time.monotonic()
        self._warned_beat: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop_thread_id: int | None = None
        self._outer_frames: frozenset[int] = frozenset()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="asyncsql-watchdog",
                                        daemon=True)

    def start(self) -> None:
        """Start the heartbeat on the running loop (call it there) and the watching thread."""
        self._loop_thread_id = threading.get_ident()
        self._outer_frames = _frames_below_the_loop(_compat.current_frame())
        self._tick()
        self._thread.start()

    def stop(self) -> None:
        """Stop the heartbeat and the thread; from the loop's thread."""
        self._stopping.set()
        if self._timer is not None:
            self._timer.cancel()
        if self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT_S)

    def overdue_s(self, now: float) -> float:
        """How long past its due time the loop's next heartbeat is, at ``now`` (0 if not)."""
        return max(0.0, now - (self._beat + self.interval_s))

    def check(self, now: float) -> bool:
        """Log what an episode needs at ``now``; whether a warning was logged."""
        beat = self._beat
        if self._warned_beat is not None and beat != self._warned_beat:
            logger.info("The event loop of this asyncsql child runs again after being blocked "
                        "for about %.1fs.", beat - self._warned_beat - self.interval_s)
            self._warned_beat = None
            self._tell(False)
        overdue_s = self.overdue_s(now)
        if overdue_s <= self.threshold_s or self._warned_beat is not None:
            return False
        self._warned_beat = beat
        self._warn(overdue_s)
        self._tell(True)
        return True

    def _tell(self, blocked: bool) -> None:
        if self._on_episode is not None:
            self._on_episode(blocked)

    def _tick(self) -> None:
        self._beat = time.monotonic()
        self._timer = self._loop.call_later(self.interval_s, self._tick)

    def _watch(self) -> None:
        while not self._stopping.wait(self.interval_s):
            try:
                self.check(time.monotonic())
            except Exception:  # a watchdog that dies would be silent from then on
                logger.exception("The asyncsql loop watchdog failed to check the loop")

    def _warn(self, overdue_s: float) -> None:
        running = asyncio.current_task(self._loop)  # reads a dict: safe from this thread
        stack = _running_stack(_compat.thread_frames().get(self._loop_thread_id or 0),
                               self._outer_frames)
        logger.warning(
            "The event loop of this asyncsql child has not run for %.1fs "
            "(asyncsql_loop_block_warning_s = %s): %s blocks it, and every other task of "
            "this child waits meanwhile. Await instead of blocking (asyncio.to_thread for "
            "a blocking call). The loop thread's stack:\n%s",
            overdue_s, self.threshold_s, self._describe(running), stack.rstrip("\n"))


def _frames_below_the_loop(frame: FrameType | None) -> frozenset[int]:
    """The frames (by id) that run the loop, seen from a coroutine running on it.

    They live as long as the loop runs. asyncio's loop is Python code, but
    uvloop's is not, so its callbacks are not found by their code: past the
    outermost coroutine frame, every frame is the loop's or below it.
    """
    while frame is not None and not frame.f_code.co_flags & inspect.CO_COROUTINE:
        frame = frame.f_back
    while frame is not None and frame.f_code.co_flags & inspect.CO_COROUTINE:
        frame = frame.f_back
    below = set()
    while frame is not None:
        below.add(id(frame))
        frame = frame.f_back
    return frozenset(below)


def _running_stack(frame: FrameType | None, outer_frames: frozenset[int] = frozenset()) -> str:
    """The stack of the callback or Task step running on the loop, innermost call last.

    The frames from the loop up to the process's start (``outer_frames``),
    the same each time, are left out.
    """
    frames = []
    while (frame is not None and frame.f_code is not _LOOP_CALLBACK_CODE
           and id(frame) not in outer_frames):
        frames.append((frame, frame.f_lineno))
        frame = frame.f_back
    return "".join(traceback.StackSummary.extract(reversed(frames)).format()) or "(none)\n"
