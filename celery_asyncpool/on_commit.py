"""Sending a task when, and only when, a session's transaction commits: ``send_on_commit``.

A request that inserts a row and sends a task to process it races its own
commit: the task may run before the row is there, or for a row rolled back.
Registered here, the send waits for the session's outermost transaction to
commit, and never happens if it rolls back or the session closes without
committing. Savepoints follow SQLAlchemy: a send registered inside
``begin_nested()`` goes with the savepoint's rollback, and on its release
becomes the enclosing transaction's. The sends of one commit go out together,
in the order they were registered, through ``aapply_async`` (off the loop),
after ``commit()`` returns.

A crash between the commit and the send loses the send: the commit is the
database's and the publish the broker's, and nothing makes them one. Where
that matters, write an outbox row in the transaction instead (docs/web.md).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from celery import Task
from celery.canvas import Signature
from celery.result import AsyncResult

from .publish import aapply_async

logger = logging.getLogger(__name__)

PENDING_KEY = "asyncsql_send_on_commit"


def send_on_commit(session: Any, target: Signature | Task[Any, Any], args: Any = None,
                   kwargs: Any = None, **options: Any) -> asyncio.Future[AsyncResult[Any]]:
    """Send ``target`` (a task or any signature, with ``apply_async``'s options) once the
    transaction ``session`` is in commits; begins one if none has begun.

    Returns a future of the sent task's ``AsyncResult``: cancelled if the transaction
    does not commit, the publish's exception if sending failed (also logged with the
    task). Call it on the loop that runs the session.
    """
    if not isinstance(target, (Signature, Task)):
        raise TypeError(f"send_on_commit() sends a task or a signature, not "
                        f"{type(target).__name__}")
    sync = getattr(session, "sync_session", session)
    transaction = sync.get_nested_transaction() or sync.get_transaction() or sync.begin()
    _listen(sync)
    sent: asyncio.Future[AsyncResult[Any]] = asyncio.get_running_loop().create_future()
    sync.info.setdefault(PENDING_KEY, []).append(
        _Send(transaction, target, args, kwargs, options, sent))
    return sent


class _Send:
    __slots__ = ("transaction", "target", "args", "kwargs", "options", "future")

    def __init__(self, transaction: Any, target: Any, args: Any, kwargs: Any,
                 options: dict[str, Any], future: asyncio.Future[AsyncResult[Any]]) -> None:
        self.transaction = transaction
        self.target, self.args, self.kwargs, self.options = target, args, kwargs, options
        self.future = future

    @property
    def name(self) -> str:
        return str(getattr(self.target, "name", None) or getattr(self.target, "task", "?"))


def _listen(sync: Any) -> None:
    from sqlalchemy import event

    if not event.contains(sync, "after_commit", _after_commit):
        event.listen(sync, "after_commit", _after_commit)
        event.listen(sync, "after_transaction_end", _after_transaction_end)


def _after_commit(sync: Any) -> None:
    """A savepoint's release hands its sends to the enclosing transaction; the outermost
    commit sends them all."""
    pending: list[_Send] = sync.info.get(PENDING_KEY, [])
    committed = sync.get_nested_transaction() or sync.get_transaction()
    if committed is None:
        return
    if committed.nested:
        for send in pending:
            if send.transaction is committed:
                send.transaction = committed.parent
        return
    ready = [send for send in pending if send.transaction is committed]
    sync.info[PENDING_KEY] = [send for send in pending if send.transaction is not committed]
    if ready:
        task = asyncio.get_running_loop().create_task(_send_all(ready))
        _running.add(task)
        task.add_done_callback(_running.discard)


def _after_transaction_end(sync: Any, transaction: Any) -> None:
    """Sends still held by a transaction that ended were not committed: drop them."""
    pending: list[_Send] = sync.info.get(PENDING_KEY, [])
    for send in [send for send in pending if send.transaction is transaction]:
        send.future.cancel()
        pending.remove(send)


_running: set[asyncio.Task[None]] = set()


async def _send_all(ready: list[_Send]) -> None:
    for send in ready:
        if send.future.cancelled():
            continue
        try:
            result = await aapply_async(send.target, send.args, send.kwargs, **send.options)
        except Exception as exc:
            logger.error("Task %s was not sent after its transaction committed: %r",
                         send.name, exc)
            send.future.set_exception(exc)
            send.future.add_done_callback(_seen)
        else:
            send.future.set_result(result)


def _seen(future: asyncio.Future[Any]) -> None:
    """The failure is logged: asyncio need not report it again if nobody awaits it."""
    if not future.cancelled():
        future.exception()
