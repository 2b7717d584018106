"""What a task body leaves behind when it returns: asyncio Tasks still pending, sessions open.

Each async job's body runs as an asyncio Task in a context of its own
(``tracer.drive``); ``watch`` puts a ``Leftovers`` in that context. From
then on, the child loop's task factory (``install_task_factory``) adds every
Task the body (or a Task it started) creates, until the Task is done, and
``session()`` notes every session it opens (``databases.api.note_sessions``). When the body is done,
``clean_up`` settles what is left, naming the job:

- Tasks still pending are cancelled, as ``asyncio.run()`` cancels them when
  its main coroutine returns: a job's work must end with its job, or it runs
  outside its slot, its time limits and revoke, with no outcome stored.
- Sessions still in a transaction (a query without ``async with``, a
  ``begin()`` never committed) are rolled back and closed, so their pooled
  connections go back to the pool now, not when the garbage collector
  terminates them.

Cost per job: one context variable set, and per Task created in the body one
set insert and one done callback; nothing is scanned.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ..databases.api import note_sessions

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

logger = logging.getLogger(__name__)

_current: contextvars.ContextVar[Leftovers | None] = contextvars.ContextVar(
    "celery_asyncpool_leftovers", default=None)


class Leftovers:
    """The pending Tasks and the sessions of one task body."""

    __slots__ = ("sessions", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.sessions: list[AsyncSession] = []  # closed ones too: no hook sees a close

    def _enter(self) -> None:
        _current.set(self)
        note_sessions(self.sessions)


def watch(context: contextvars.Context) -> Leftovers:
    """Collect what code running in ``context`` starts and opens, from now on."""
    leftovers = Leftovers()
    context.run(leftovers._enter)
    return leftovers


def install_task_factory(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop`` note each Task created inside a watched body, on top of its own factory.

    A factory set on the loop later (by a ``worker_process_init`` handler, say)
    replaces this one, and pending Tasks are then no longer found.
    """
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any],
                **kwargs: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any]
        if previous is None:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        else:
            task = previous(loop, coro, **kwargs)  # type: ignore[assignment]
        leftovers = _current.get()
        if leftovers is not None:
            leftovers.tasks.add(task)
            task.add_done_callback(leftovers.tasks.discard)
        return task

    # typeshed before 3.13 lacks the ``context`` argument.
    loop.set_task_factory(factory)  # type: ignore[arg-type, unused-ignore]


async def clean_up(leftovers: Leftovers, label: str, grace_s: float, *,
                   cancel_tasks: bool = True) -> None:
    """Cancel the body's pending Tasks, then close its sessions still in a transaction.

    The Tasks get ``grace_s`` to unwind first, so that their own ``async with``
    blocks close their sessions. ``cancel_tasks=False`` leaves them alone (a
    body that was itself cancelled: the driver's own clean-up Tasks may still
    run). ``label`` names the job in the warnings.
    """
    if cancel_tasks and leftovers.tasks:
        await _cancel_pending(set(leftovers.tasks), label, grace_s)
    open_sessions = [s for s in leftovers.sessions if s.in_transaction()]
    if open_sessions:
        await _close_sessions(open_sessions, label)


async def _cancel_pending(pending: set[asyncio.Task[Any]], label: str, grace_s: float) -> None:
    logger.warning(
        "Task %s returned while %d asyncio Task(s) it started were still pending (%s): "
        "cancelling them, as asyncio.run() would. Await them before returning (or start "
        "them in an asyncio.TaskGroup); work that must outlive the task belongs in a task "
        "of its own (send it) or an @on_child_start hook.",
        label, len(pending), ", ".join(sorted(_coroutine_name(t) for t in pending)))
    for task in pending:
        task.cancel(f"celery_asyncpool: task {label} returned without awaiting it")
    _, still = await asyncio.wait(pending, timeout=grace_s)
    if still:
        logger.warning("Task %s: %d of the Tasks it left pending did not finish within %ss "
                       "of being cancelled: they swallow CancelledError (re-raise it).",
                       label, len(still), grace_s)


async def _close_sessions(sessions: list[AsyncSession], label: str) -> None:
    logger.warning(
        "Task %s returned with %d session(s) still in a transaction, each holding a pooled "
        "connection: rolling back and closing them. Open sessions with "
        "`async with session() as s:` (and `await s.commit()` inside the block).",
        label, len(sessions))
    for session in sessions:
        try:
            await session.close()
        except Exception:
            logger.exception("Closing a session that task %s left open failed", label)


def _coroutine_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or repr(coro)
