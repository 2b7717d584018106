"""Task states written to a Redis result backend in one round trip that never replaces a SUCCESS.

Celery's Redis backend writes a state in two round trips: it reads the stored
meta, and unless that says SUCCESS it sets the new one and publishes it.
Between the two another writer may store SUCCESS, which the second then
replaces (a parent's REVOKED or ``TimeLimitExceeded`` racing the child's
SUCCESS). ``STORE`` does the read and the write in one script, atomically,
with Celery's rules: a stored SUCCESS stays, the key expires after
``result_expires`` (``result_failure_expires`` for a FAILURE), and the new
meta is published on the key's channel, which wakes ``AsyncResult.get()``.

The script reads the stored status only from a value it can decode: JSON,
uncompressed (Celery's default). For pickle, msgpack or a compressed result
it sets the value only where none is stored, and otherwise returns the stored
one; the client decodes it and, unless it is a SUCCESS, replaces it with
``SWAP`` if it is still the same (a second round trip only when a value was
already there).

``ResultStore`` is the backend's ``_store_result`` (``install``): Celery's own
``store_result`` still encodes the result, retries by
``result_backend_always_retry`` and raises its errors. In a worker child's
tracer the write is awaited on the child's loop through ``redis.asyncio``
(``AsyncWriter``), so the tracer's siblings keep running while it is stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
from celery import states
from celery.exceptions import BackendStoreError
from kombu.utils.functional import fxrange

from . import _compat

logger = logging.getLogger(__name__)

# KEYS[1]: the task's key. ARGV: the meta, its lifetime in seconds (0: none), and
# "json" when the script may decode a stored meta to read its status.
# Returns 1 (stored), 0 (a SUCCESS is stored: kept) or the stored meta it could not judge.
STORE = """
local key, meta, ttl, judge = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3] == 'json'
local function write()
  if ttl > 0 then redis.call('SET', key, meta, 'EX', ttl) else redis.call('SET', key, meta) end
  redis.call('PUBLISH', key, meta)
  return 1
end
local stored
if ttl > 0 then stored = redis.pcall('SET', key, meta, 'EX', ttl, 'NX', 'GET')
else stored = redis.pcall('SET', key, meta, 'NX', 'GET') end
if type(stored) == 'table' and stored.err then
  stored = redis.call('GET', key)  -- a server before 7.0 has no SET NX GET
  if not stored then return write() end
elseif not stored then
  redis.call('PUBLISH', key, meta)
  return 1
end
if not judge then return stored end
local decoded, old = pcall(cjson.decode, stored)
if not decoded or type(old) ~= 'table' then return stored end
if old['status'] == 'SUCCESS' then return 0 end
return write()
"""

# KEYS[1]: the task's key. ARGV: the meta, its lifetime, and the meta read before.
# Returns 1 (stored), or what is stored now when it changed since (false: nothing).
SWAP = """
local key, meta, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
local stored = redis.call('GET', key)
if stored ~= ARGV[3] then return stored end
if ttl > 0 then redis.call('SET', key, meta, 'EX', ttl) else redis.call('SET', key, meta) end
redis.call('PUBLISH', key, meta)
return 1
"""

STORED, KEPT = 1, 0

Write = Callable[[str, Any, int], Awaitable[None]]


def is_redis(backend: Any) -> bool:
    """Whether ``backend`` is Celery's Redis (or Sentinel) result backend."""
    from celery.backends.redis import RedisBackend

    return isinstance(backend, RedisBackend)


def judged_by_script(backend: Any) -> bool:
    """Whether the script can read a stored status: JSON meta, uncompressed."""
    return bool(backend.serializer == "json" and not backend.compression)


class ResultStore:
    """One Redis backend's ``_store_result``: the meta built as Celery does, written by ``STORE``.

    ``writer`` is awaited instead, on the loop it belongs to, when the call
    comes from a tracer there (``in_tracer``, ``await_io``).
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.judge = "json" if judged_by_script(backend) else "raw"
        self._store = backend.client.register_script(STORE)
        self._swap = backend.client.register_script(SWAP)
        self.writer: AsyncWriter | None = None
        self.in_tracer: Callable[[], bool] = lambda: False
        self.await_io: Callable[[Any], Any] = lambda coro: None

    def __call__(self, task_id: Any, result: Any, state: str, traceback: Any = None,
                 request: Any = None, **kwargs: Any) -> Any:
        backend = self.backend
        meta = _compat.result_meta(backend, result, state, traceback, request)
        meta["task_id"] = _text(task_id)
        value = backend.encode(meta)
        if len(value) > _compat.max_redis_value(backend):
            raise BackendStoreError(  # type: ignore[call-arg, unused-ignore]
                "value too large for Redis backend", state=state, task_id=task_id)
        key = _text(backend.get_key_for_task(task_id))
        ttl = lifetime(backend, state)
        if self.writer is not None and self.in_tracer():
            self.await_io(self.writer.write(key, value, ttl))
        else:
            backend.ensure(self._write, (key, value, ttl))
        return result

    def _write(self, key: str, value: Any, ttl: int) -> None:
        reply = self._store(keys=[key], args=[value, ttl, self.judge])
        while reply not in (STORED, KEPT):
            if self.stored_success(reply):
                return
            reply = self._swap(keys=[key], args=[value, ttl, reply])
            if reply is None:
                reply = self._store(keys=[key], args=[value, ttl, self.judge])

    def stored_success(self, stored: bytes) -> bool:
        """Whether a stored meta the script could not read says SUCCESS."""
        try:
            meta = self.backend.decode(stored)
        except Exception:  # not Celery's meta: replaced, as Celery would not read it either
            return False
        return isinstance(meta, dict) and meta.get("status") == states.SUCCESS


class AsyncWriter:
    """``ResultStore``'s writes through ``redis.asyncio`` on one loop, with Celery's retry policy.

    The writes a loop iteration asks for go out together, as one pipeline of
    script calls (a lone write as a plain call): a child with many tasks
    finishing at once pays one round trip and one system call for all of them,
    not one each. Its client is made on that loop at the first write, with the
    backend's connection settings, and closed by ``aclose`` with the loop.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._client: redis.asyncio.Redis | None = None
        self._shas = (_sha(STORE), _sha(SWAP))
        # The writes waiting for this iteration's leader to send them; None: no leader yet.
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] | None = None

    def client(self) -> redis.asyncio.Redis:
        if self._client is None:
            self._client = async_client(self.store.backend)
        return self._client

    async def write(self, key: str, value: Any, ttl: int) -> None:
        """Write as ``ResultStore._write`` does, retrying as Celery's ``backend.ensure``."""
        backend = self.store.backend
        intervals = None  # the retry policy is read only once a write has failed
        for retries in itertools.count():
            try:
                return await self._write(key, value, ttl)
            except backend.connection_errors as exc:
                policy = backend.retry_policy
                max_retries = policy.get("max_retries")
                if max_retries is not None and retries >= max_retries:
                    raise
                intervals = intervals or retry_intervals(policy)
                await asyncio.sleep(backend.on_connection_error(max_retries, exc, intervals,
                                                                retries))

    async def _write(self, key: str, value: Any, ttl: int) -> None:
        judge = self.store.judge
        reply = await self._call(0, key, value, ttl, judge)
        while reply not in (STORED, KEPT):
            if self.store.stored_success(reply):
                return
            reply = await self._call(1, key, value, ttl, reply)
            if reply is None:
                reply = await self._call(0, key, value, ttl, judge)

    async def _call(self, script: int, key: str, *args: Any) -> Any:
        """Script ``script`` (0: STORE, 1: SWAP) on ``key``, sent with this iteration's others.

        The first caller of an iteration leads: it lets the iteration's other
        writes join, then sends them all and hands each its reply.
        """
        call = (script, key, *args)
        if self._pending is not None:
            reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending.append((call, reply))
            return await reply
        batch = self._pending = []
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:  # the loop is closing: the others are still sent
            self._pending = None
            asyncio.ensure_future(self._flush(batch))
            raise
        self._pending = None
        if not batch:
            return await self._send_one(call)
        reply = asyncio.get_running_loop().create_future()
        await self._flush([(call, reply), *batch])
        return reply.result()

    async def _send_one(self, call: tuple[Any, ...]) -> Any:
        script, key, *args = call
        try:
            return await self.client().evalsha(self._shas[script], 1, key, *args)
        except redis.exceptions.NoScriptError:
            await self._load_scripts()  # a flushed or restarted server: once more
            return await self.client().evalsha(self._shas[script], 1, key, *args)

    async def _flush(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        """Send ``batch`` as one pipeline; each reply (or error) goes to its caller."""
        try:
            replies = await self._pipeline([call for call, _ in batch])
            if any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                await self._load_scripts()  # a flushed or restarted server: once more
                replies = await self._pipeline([call for call, _ in batch])
        except Exception as exc:  # the whole pipeline failed: every caller retries
            replies = [exc] * len(batch)
        for (_, reply), value in zip(batch, replies):
            if reply.done():
                continue
            if isinstance(value, Exception):
                reply.set_exception(value)
            else:
                reply.set_result(value)

    async def _pipeline(self, calls: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self.client().pipeline(transaction=False)
        for script, key, *args in calls:
            pipe.execute_command("EVALSHA", self._shas[script], 1, key, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def _load_scripts(self) -> None:
        for source in (STORE, SWAP):
            await self.client().script_load(source)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose(close_connection_pool=True)


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


def lifetime(backend: Any, state: str) -> int:
    """The seconds a state's key lives (0: for ever), as Celery's ``_set_with_state`` sets."""
    expires = backend.failure_expires if state == states.FAILURE else None
    if expires is None:
        expires = backend.expires
    return int(expires) if expires else 0


def retry_intervals(policy: dict[str, Any]) -> Any:
    """The waits of kombu's ``retry_over_time`` for a retry policy, as an iterator."""
    start = policy.get("interval_start", 2)
    step = policy.get("interval_step", 2)
    most = float(policy.get("interval_max", 30))
    waits = fxrange(  # type: ignore[no-untyped-call, unused-ignore]
        start, most + start, step, repeatlast=True)
    return (min(value, most) for value in waits)


# The connection classes of redis-py's asyncio client for those Celery configures.
_ASYNC_CONNECTIONS = {
    redis.Connection: redis.asyncio.Connection,
    redis.SSLConnection: redis.asyncio.SSLConnection,
    redis.UnixDomainSocketConnection: redis.asyncio.UnixDomainSocketConnection,
    redis.sentinel.SentinelManagedConnection: redis.asyncio.sentinel.SentinelManagedConnection,
    redis.sentinel.SentinelManagedSSLConnection:
        redis.asyncio.sentinel.SentinelManagedSSLConnection,
}


def async_client(backend: Any) -> redis.asyncio.Redis:
    """A ``redis.asyncio`` client with the backend's connection settings, for the running loop.

    ``redis_socket_timeout``, ``redis_socket_connect_timeout``,
    ``redis_max_connections``, ``redis_backend_use_ssl`` and the URL's
    parameters reach it as they reach Celery's own client: through the
    backend's ``connparams``.

    Raises:
        ValueError: the backend uses a connection class with no asyncio twin.
    """
    params = dict(backend.connparams)
    sync_class = params.pop("connection_class", None)
    hosts = params.pop("hosts", None)
    if hosts is not None:
        return _sentinel_client(backend, hosts, params, sync_class)
    async_class = _ASYNC_CONNECTIONS.get(sync_class or redis.Connection)
    if async_class is None:
        raise ValueError(f"no asyncio twin for the connection class {sync_class!r}")
    if async_class is redis.asyncio.SSLConnection:
        params["ssl_cert_reqs"] = _cert_reqs(params.get("ssl_cert_reqs"))
    pool = redis.asyncio.ConnectionPool(connection_class=async_class, **params)
    return redis.asyncio.Redis(connection_pool=pool)


def _sentinel_client(backend: Any, hosts: list[dict[str, Any]], params: dict[str, Any],
                     sync_class: Any) -> redis.asyncio.Redis:
    options = backend.app.conf.get("result_backend_transport_options") or {}
    if sync_class is not None:
        params["connection_class"] = _ASYNC_CONNECTIONS[sync_class]
    sentinel = redis.asyncio.sentinel.Sentinel(
        [(host["host"], host["port"]) for host in hosts],
        min_other_sentinels=options.get("min_other_sentinels", 0),
        sentinel_kwargs=options.get("sentinel_kwargs", {}), **params)
    credentials = {key: params[key] for key in ("username", "password") if key in params}
    client: redis.asyncio.Redis = sentinel.master_for(
        str(options.get("master_name")), redis_class=redis.asyncio.Redis, **credentials)
    return client


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cert_reqs(value: Any) -> Any:
    """``ssl_cert_reqs`` as redis-py's asyncio client takes it (Celery made it a constant)."""
    names = {ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional", ssl.CERT_REQUIRED: "required"}
    return names.get(value, value if value is not None else "required")


def install(backend: Any) -> ResultStore | None:
    """Make ``backend``'s state writes ``ResultStore``'s, if it is a Redis backend; return it."""
    if not is_redis(backend):
        return None
    store = getattr(backend, _compat.STORE_RESULT)
    if isinstance(store, ResultStore):
        return store
    store = ResultStore(backend)
    setattr(backend, _compat.STORE_RESULT, store)
    return store


def sleep_in(backend: Any, in_tracer: Callable[[], bool],
             await_io: Callable[[Any], Any]) -> None:
    """Make ``result_backend_always_retry``'s waits awaited when they come from a tracer."""
    def sleep(seconds: float) -> None:
        if in_tracer():
            await_io(asyncio.sleep(seconds))
        else:
            time.sleep(seconds)
    setattr(backend, _compat.BACKEND_SLEEP, sleep)
