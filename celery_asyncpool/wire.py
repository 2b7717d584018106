"""The messages between the pool's parent and its children, and the pipes they cross.

Each child has two pipes of its own, made by its parent before the child is
started: jobs go down one, reports come up the other. Nothing else can write
to them, so a message is trusted as the parent's (or the child's) own.

A message is a tuple ``(kind, *fields)``, pickled, behind a 4-byte big-endian
length. Parent to child:

- ``(JOB, job_id, target, args, kwargs)``: run ``target(*args, **kwargs)``
  (Celery's tracer) and report it.
- ``(CANCEL, job_id, reason)``: cancel that job's coroutine; ``reason`` is
  one of ``CANCEL_REASONS``.
- ``(STOP,)``: take no more jobs, finish those in flight, dispose, exit.

Child to parent:

- ``(UP, pid)``: the child is ready for jobs.
- ``(ACK, job_id, pid, time_accepted)``: the job started (``time.monotonic()``
  of the child, as Celery's ``Request.on_accepted`` expects).
- ``(READY, job_id, outcome)``: the job is done; ``outcome`` is the tracer's
  return value. A job cancelled for a hard time limit, a revoke or a cold
  shutdown stores nothing in the child; the parent settles it.
- ``(DRAINING, reason)``: send no more jobs (``max_tasks_per_child``,
  ``max_memory_per_child``); the child exits once its jobs are done.
- ``(STATS, snapshot)``: in-flight count and engine pool use, every
  ``STATS_INTERVAL_S`` from the child's loop: the parent also reads it as a
  sign that the loop runs.
- ``(BLOCKED, blocked)``: from the loop watchdog's thread, ``True`` when the
  loop has not run for ``asyncsql_loop_block_warning_s``, ``False`` once it runs
  again: no new job goes to a child whose loop cannot start it.
- ``(BYE,)``: the child has disposed its engines and is exiting.
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
from typing import Any

from . import _compat

JOB = "job"
CANCEL = "cancel"
STOP = "stop"
UP = "up"
ACK = "ack"
READY = "ready"
DRAINING = "draining"
STATS = "stats"
BLOCKED = "blocked"
BYE = "bye"

STATS_INTERVAL_S = 1.0

SOFT = "soft"
HARD = "hard"
REVOKE = "revoke"
SHUTDOWN = "shutdown"
CANCEL_REASONS = (SOFT, HARD, REVOKE, SHUTDOWN)
# The message of the ``CancelledError`` a task body sees, by reason.
CANCEL_MESSAGES = {
    SOFT: "celery_asyncpool: soft time limit exceeded",
    HARD: "celery_asyncpool: hard time limit exceeded",
    REVOKE: "celery_asyncpool: revoked",
    SHUTDOWN: "celery_asyncpool: worker shutdown",
}

_HEADER = struct.Struct("!I")
_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031  # Linux


def task_label(args: tuple[Any, ...]) -> str:
    """``name[id]`` of the task a JOB runs, from its ``args`` (name, id, request, body, ...)."""
    name = args[0] if args else "?"
    task_id = args[1] if len(args) > 1 else "?"
    return f"{name}[{task_id}]"


def encode(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class Decoder:
    """Turns the bytes read from a pipe, in whatever pieces they arrive, into messages."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            end = _HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(self._buffer[_HEADER.size:end]))
            del self._buffer[:end]
        return messages


def read_available(fd: int, decoder: Decoder) -> list[tuple[Any, ...]] | None:
    """Messages from what ``fd`` (non-blocking) has now; None once the writer has closed it."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        except InterruptedError:
            continue
        if not chunk:
            if not chunks:
                return None
            break
        chunks.append(chunk)
    return decoder.feed(b"".join(chunks))


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to a blocking ``fd`` whole."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue


def write_some(fd: int, data: bytes) -> int:
    """Write what a non-blocking ``fd`` takes now; the number of bytes written."""
    try:
        return os.write(fd, data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return -1
        raise


def make_pipe() -> tuple[int, int]:
    """A pipe with a large buffer, so a burst of messages seldom waits for the reader."""
    read_fd, write_fd = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
    except (ImportError, OSError):
        pass
    return read_fd, write_fd


class PipeEnd:
    """A child's end of a pipe: as is across fork; duplicated into a spawned child.

    A spawned child starts with only the descriptors billiard passes it, so
    pickling this for a spawn (billiard's ``DupFd``, only valid then) asks
    billiard to pass this one.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return _received_pipe_end, (_compat.dup_fd_for_spawn(self.fd),)


def _received_pipe_end(dup: Any) -> PipeEnd:
    return PipeEnd(dup.detach())
