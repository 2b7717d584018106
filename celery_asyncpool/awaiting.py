"""Awaiting a task's result without blocking the loop: ``await aget(result)``.

``AsyncResult.get()`` blocks its thread until the task is done: on a web
server's loop it stops every other request for that long. Here the wait is
awaited. On a Redis result backend it is woken by the backend's pub/sub (every
state stored is published on the result's key): the channel is subscribed
before the stored state is read, so a result stored in between is not missed,
and after a lost connection both are done again. Each loop has its own
``redis.asyncio`` client for this, closed when the loop's runner shuts it down
(``asyncio.run`` does). Other backends are polled every ``interval`` seconds,
each read on a thread (``offload``).

The outcome follows ``AsyncResult.get()``: the value of a task that succeeded;
with ``propagate`` (the default) the task's exception for FAILURE and
REVOKED, else that exception as the value. Parents' failures are not followed.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from celery import current_task, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult, GroupResult, ResultSet

from . import offload, results
from .databases.standalone import at_loop_shutdown

POLL_INTERVAL_S = 0.5
SUBTASK_DEADLOCK = (
    "A task awaited another task's result: with every slot of the worker awaiting results "
    "of tasks queued behind them, nothing runs and the worker deadlocks (Celery refuses "
    "result.get() in a task for the same reason). Chain the tasks instead (a chord or a "
    "callback), or pass disable_sync_subtasks=False where the subtask cannot wait on this "
    "worker's slots.")

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = \
    weakref.WeakKeyDictionary()


async def aget(result: AsyncResult[Any] | ResultSet, timeout: float | None = None,
               propagate: bool = True, interval: float = POLL_INTERVAL_S,
               disable_sync_subtasks: bool = True) -> Any:
    """The result of a task (``AsyncResult``), or the list of a group's (``GroupResult``,
    ``ResultSet``, in order), awaited.

    Raises:
        celery.exceptions.TimeoutError: not ready within ``timeout`` seconds.
        RuntimeError: awaited inside a task, unless ``disable_sync_subtasks=False``.
        The task's exception, with ``propagate``.
    """
    if disable_sync_subtasks and current_task and current_task.request.id:
        raise RuntimeError(SUBTASK_DEADLOCK)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    if isinstance(result, (GroupResult, ResultSet)):
        return [await _one(part, deadline, propagate, interval) for part in result.results or ()]
    return await _one(result, deadline, propagate, interval)


async def _one(result: AsyncResult[Any], deadline: float | None, propagate: bool,
               interval: float) -> Any:
    backend = result.backend
    waited = (_by_pubsub(result.id, backend, deadline) if results.is_redis(backend)
              else _by_polling(result.id, backend, deadline, interval))
    meta = await waited
    value = meta["result"]
    if propagate and meta["status"] in states.PROPAGATE_STATES:
        raise value if isinstance(value, BaseException) else Exception(value)
    return value


async def _by_polling(task_id: str, backend: Any, deadline: float | None,
                      interval: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    while True:
        meta: dict[str, Any] = await offload.call(backend.get_task_meta, task_id)
        if meta["status"] in states.READY_STATES:
            return meta
        _check_deadline(task_id, deadline)
        left = None if deadline is None else deadline - loop.time()
        await asyncio.sleep(interval if left is None else max(0.0, min(interval, left)))


async def _by_pubsub(task_id: str, backend: Any, deadline: float | None) -> dict[str, Any]:
    import redis

    client = _client(backend)
    key = backend.get_key_for_task(task_id)
    while True:
        try:
            return await _subscribe_then_read(client, backend, key, task_id, deadline)
        except (redis.ConnectionError, redis.TimeoutError):
            _check_deadline(task_id, deadline)
            await asyncio.sleep(0.1)  # then subscribe and read again: nothing is missed


async def _subscribe_then_read(client: Any, backend: Any, key: bytes, task_id: str,
                               deadline: float | None) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(key)
        raw = await client.get(key)
        while True:
            if raw is not None:
                meta: dict[str, Any] = backend.decode_result(raw)
                if meta["status"] in states.READY_STATES:
                    return meta
            _check_deadline(task_id, deadline)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            message = await pubsub.get_message(timeout=left)
            raw = message["data"] if message and message.get("type") == "message" else None


def _check_deadline(task_id: str, deadline: float | None) -> None:
    if deadline is not None and asyncio.get_running_loop().time() >= deadline:
        raise CeleryTimeoutError(f"The operation timed out: task {task_id} is not ready")


def _client(backend: Any) -> Any:
    """The running loop's client for this backend's server, closed with the loop."""
    loop = asyncio.get_running_loop()
    clients = _clients.setdefault(loop, {})
    key = id(backend)
    if key not in clients:
        clients[key] = client = results.async_client(backend)
        at_loop_shutdown(client.aclose)
    return clients[key]
