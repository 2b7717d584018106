"""A Redis broker transport that fetches a batch per round trip and acks a pass at once.

Opt in with ``broker_transport = "celery_asyncpool.broker:Transport"`` (or
``SentinelTransport`` for a ``sentinel://`` URL); ``broker_url`` stays as it
is. It is kombu's Redis transport, messages, keys and all, with three changes
where the worker's parent spends its time and its losses:

- Fetch: while messages wait, one ``FETCH`` script call (``broker_scripts``)
  takes up to the free prefetch window (at most ``fetch_limit``, a transport
  option, default 100) and records each in kombu's unacked hash and index in the
  same atomic step. Stock kombu pops one message per ``BRPOP``, then records it
  in a second round trip: a worker killed between the two loses it.
- Wait: a script cannot block, so once a fetch comes back short the channel
  waits with kombu's ``BRPOP`` (server-side timeout, no busy loop) and hands
  the message it returns to the next ``FETCH`` call, which records it and takes
  whatever else arrived. That popped message has stock kombu's loss window,
  one round trip long; every other message has none.
- Ack: acks and rejects issued during one pass of the worker's hub go out in
  one ``ACK`` script call at the start of the next pass, and only remove an
  unacked entry that still carries this worker's score, so a late ack cannot
  drop the record of a copy redelivered elsewhere after ``visibility_timeout``.

- Budget: a message that waits for a pool slot past ``visibility_timeout`` is
  restored and runs twice; the channel holds no more waiting messages than
  the pool, at its measured pace, starts in half that time.

A payload that is not a kombu message (not JSON, or no delivery tag) is moved
to ``_asyncsql.dead_letter.<queue>`` and logged with the queue and the key;
stock kombu pops it and loses it on the decode error.
"""

# kombu's Redis transport, which this module subclasses, has no annotations.
# mypy: allow-untyped-calls

from __future__ import annotations

import json
import logging
import time
from queue import Empty
from typing import Any, cast

import redis
from kombu.asynchronous import get_event_loop
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from . import _compat
from .broker_scripts import ACK, FETCH
from .messages import excerpt

logger = logging.getLogger(__name__)

DEAD_LETTER = "_asyncsql.dead_letter.{queue}"


class BatchQoS(kombu_redis.QoS):
    """kombu's Redis QoS whose acks and rejects go out once per hub pass."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: delivery tag -> the index score recorded for it ('' where kombu recorded it)
        self.recorded: dict[str, str] = {}
        self._acks: list[tuple[str, str]] = []
        #: messages the pool started per second while others waited (None: not yet known)
        self.pace: float | None = None
        #: what may wait until the pace is known: doubles each time the pool keeps up
        self.ramp = 1
        self.ramp_filled = False  # a fetch took all the ramp allowed
        self.windowed = False  # its consumer set a prefetch window (basic_qos)
        self._window: tuple[float, int] | None = None  # waiting since, acks since

    def can_consume(self) -> bool:
        return bool(super().can_consume()) and (not self.budgeted or self.start_budget() > 0)

    @property
    def budgeted(self) -> bool:
        """Whether the visibility budget holds this channel back.

        Only the worker's task consumer has one: it sets a prefetch window. kombu
        asks ``can_consume()`` before reading any reply, so a budget on the
        control channel would leave broadcasts unread, and one on a client's reply
        consumer in the worker's process (an ``inspect`` from a thread, the
        in-process test worker) would leave its replies unread while the worker's
        tasks wait.
        """
        channel: Any = self.channel
        return bool(channel.visibility_budget) and self.windowed

    def start_budget(self) -> int:
        """How many more messages the pool will start well within ``visibility_timeout``.

        A message that waits longer than ``visibility_timeout`` for a pool slot is
        restored and runs twice. Waiting messages start at ``pace`` a second, so at
        most ``pace * visibility_timeout / 2`` may wait; until the pace is measured,
        ``ramp``, which doubles each time the pool has started all it was given.
        """
        waiting = _compat.waiting_requests()
        if self.pace is None:
            if self.ramp_filled and not waiting:
                self.ramp, self.ramp_filled = min(2 * self.ramp, 1 << 20), False
            return max(0, self.ramp - waiting)
        channel: Any = self.channel
        return max(0, int(self.pace * channel.visibility_timeout / 2) - waiting)

    def _measure(self) -> None:
        """Count this ack towards the pace, over windows of a second in which messages waited."""
        if not _compat.waiting_requests():
            self._window = None
            return
        now = time.monotonic()
        if self._window is None:
            self._window = (now, 0)
            return
        since, acks = self._window[0], self._window[1] + 1
        if now - since < 1.0:
            self._window = (since, acks)
            return
        pace = acks / (now - since)
        self.pace = pace if self.pace is None else (self.pace + pace) / 2
        self._window = (now, 0)

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:  # the fetch script recorded it already
            virtual.QoS.append(self, message, delivery_tag)
        else:  # basic_get and the like: kombu's own way
            super().append(message, delivery_tag)
            self.recorded[delivery_tag] = ""

    def ack(self, delivery_tag: str) -> None:
        self._queue_ack(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.flush_acks()
            self.recorded.pop(delivery_tag, None)
            super().reject(delivery_tag, requeue=True)
        else:
            self.ack(delivery_tag)

    def _queue_ack(self, delivery_tag: str) -> None:
        channel: Any = self.channel
        if channel.closed or channel.connection is None:
            # An acks_late task that ended after its broker connection was lost and
            # replaced: kombu would raise AttributeError rebuilding the gone pool.
            logger.warning("The ack of %s came after its broker connection was lost: its "
                           "message will be delivered again after visibility_timeout.",
                           delivery_tag)
            return
        self._acks.append((delivery_tag, self.recorded.pop(delivery_tag, "")))
        if self.budgeted:
            self._measure()
        hub = get_event_loop()
        if hub is None:
            self.flush_acks()
        elif len(self._acks) == 1:
            hub.call_soon(self.flush_acks)

    def flush_acks(self, wait: bool = False) -> None:
        """Send the acks queued since the last flush, in one script call.

        On the worker's hub the call is written without waiting for its reply
        (``AckSender``); without a hub, or with ``wait``, it is a round trip.
        """
        acks, self._acks = self._acks, []
        channel: Any = self.channel
        if acks:
            channel.acks.send([part for ack in acks for part in ack], wait)
        if wait:
            channel.acks.wait()


class AckSender:
    """Writes ``ACK`` script calls on a connection of its own and reads their replies
    when the worker's hub finds them readable, so the hub never waits on an ack.

    The calls are ``EVAL`` with the script's text (a few hundred bytes per
    pass): a server that lost its scripts cannot refuse them. Acks whose reply
    is lost with the connection are logged; their messages are redelivered
    after ``visibility_timeout``, as after any ack that does not arrive.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.connection: Any = None
        self.unread = 0
        self._hub: Any = None

    def send(self, args: list[str], wait: bool = False) -> None:
        channel = self.channel
        keys = [channel.unacked_key, channel.unacked_index_key]
        hub = get_event_loop()
        if hub is None or wait:
            channel.run_script(ACK, keys, args)
            return
        keys = channel.prefixed(keys)
        try:
            if self.connection is None:
                self._open(hub)
            self.connection.send_command("EVAL", ACK, len(keys), *keys, *args)
            self.unread += 1
        except channel.lost_connection:
            self._drop(len(args) // 2)
            raise

    def _open(self, hub: Any) -> None:
        connection = self.channel.pool.get_connection()
        connection.connect()
        self.connection, self._hub = connection, hub
        hub.add_reader(_compat.redis_socket(connection), self.read)

    def read(self) -> None:
        """Read the replies that have arrived (the hub calls this when they can be read)."""
        try:
            while self.unread and self.connection.can_read(timeout=0):
                self._reply()
        except self.channel.lost_connection:
            self._drop(0)

    def wait(self) -> None:
        """Read every reply still due (at channel close)."""
        try:
            while self.unread:
                self._reply()
        except self.channel.lost_connection:
            self._drop(0)
        self._close()

    def _reply(self) -> None:
        try:
            self.connection.read_response()
        except redis.exceptions.ResponseError:
            logger.error("Redis refused a batch of acks: their messages will be redelivered "
                         "after visibility_timeout.", exc_info=True)
        self.unread -= 1

    def _drop(self, unsent: int) -> None:
        if self.unread or unsent:
            logger.warning("The connection carrying %d batch(es) of acks was lost: their "
                           "messages will be redelivered after visibility_timeout.",
                           self.unread + bool(unsent))
        self._close()
        self.unread = 0

    def _close(self) -> None:
        if self.connection is not None:
            sock = _compat.redis_socket(self.connection)
            if sock is not None:
                self._hub.remove_reader(sock)
            self.connection.disconnect()
            self.channel.pool.release(self.connection)
            self.connection = None


class Channel(kombu_redis.Channel):
    """kombu's Redis channel with batched fetches and acks."""

    QoS = BatchQoS
    fetch_limit = 100
    #: hold no more waiting tasks than the pool starts in half of visibility_timeout
    visibility_budget = True
    from_transport_options: tuple[str, ...] = (  # type: ignore[assignment, unused-ignore]
        *kombu_redis.Channel.from_transport_options, "fetch_limit", "visibility_budget")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake = False  # the last fetch came back short: wait with BRPOP
        self._popped: tuple[str, bytes] | None = None  # (key, payload) BRPOP returned
        self._pending: tuple[str, list[str], float, int] | None = None  # kind, keys, score, n
        self._shas: dict[str, str] = {}
        self.acks = AckSender(self)

    @property
    def batch_qos(self) -> BatchQoS:
        return cast(BatchQoS, self.qos)

    def basic_qos(self, prefetch_size: int = 0, prefetch_count: int = 0,
                  apply_global: bool = False) -> None:
        self.batch_qos.windowed = True
        super().basic_qos(prefetch_size, prefetch_count, apply_global)

    @property
    def lost_connection(self) -> tuple[type[BaseException], ...]:
        """The errors of a lost connection, which kombu sets on the channel."""
        errors: tuple[type[BaseException], ...] = cast(Any, self).connection_errors
        return errors

    # -- asking for messages ----------------------------------------------------------

    def start_poll(self, timeout: float | None = None) -> None:
        """Send a fetch (or, after a short one, a blocking wake-up) on the poll connection."""
        queues = _compat.queue_cycle(self).consume(len(self.active_queues))
        if not queues:
            return
        keys = [_compat.queue_key(self, queue, step) for step in self.priority_steps
                for queue in queues]
        connection = self.client.connection
        score = time.time()
        if self._popped is not None and self._popped[0] not in keys:
            self._put_back()  # its queue is no longer consumed
        if self._wake and self._popped is None:
            timeout = self.brpop_timeout if timeout is None else timeout
            connection.send_command("BRPOP", *self.prefixed(keys), timeout or 0)
            self._pending = ("BRPOP", keys, score, 1)
        else:
            count = self.batch_size()
            connection.send_command("EVALSHA", self._sha(FETCH),
                                    *self._fetch_args(queues, keys, score, count))
            self._pending = ("EVALSHA", keys, score, count)
        _compat.mark_poll_sent(self, connection)

    def _fetch_args(self, queues: list[str], keys: list[str], score: float,
                    count: int) -> list[Any]:
        dead = [DEAD_LETTER.format(queue=queue) for queue in queues]
        all_keys = self.prefixed([self.unacked_key, self.unacked_index_key, *keys, *dead])
        args: list[Any] = [len(all_keys), *all_keys, count, repr(score),
                           len(queues)]
        if self._popped is not None:
            key, payload = self._popped
            args += [keys.index(key) + 3, payload]
        return args

    def batch_size(self) -> int:
        """How many messages the consumer may take now, at most ``fetch_limit``."""
        if "can_consume" in vars(self.qos):
            # Celery's worker_disable_prefetch replaces the instance's can_consume
            # with a check of the pool's free slots: take one message at a time.
            return 1
        free = self.batch_qos.can_consume_max_estimate()
        count = self.fetch_limit if free is None else max(1, min(free, self.fetch_limit))
        if not self.batch_qos.budgeted:
            return count
        return min(count, max(1, self.batch_qos.start_budget()))

    # -- reading them -----------------------------------------------------------------

    def read_poll(self, **options: Any) -> bool:
        """Read the pending reply: deliver a batch, or keep what the wake-up popped."""
        # Nothing recorded: a BRPOP sent by kombu's own code, as its close() expects.
        pending, self._pending = self._pending or ("BRPOP", [], 0.0, 1), None
        try:
            kind, keys, score, count = pending
            try:
                reply = self.client.parse_response(self.client.connection, kind, **options)
            except self.lost_connection:
                self.client.connection.disconnect()
                raise
            except redis.exceptions.NoScriptError:
                self._shas.clear()  # the server lost its scripts (restart, SCRIPT FLUSH)
                raise Empty() from None
            if kind == "BRPOP":
                return self._woken(reply)
            return self._fetched(reply, keys, score, count)
        finally:
            _compat.poll_done(self)

    def _woken(self, reply: Any) -> bool:
        if not reply:
            raise Empty()
        key, payload = reply
        self._popped = (_text(key), payload)
        self._wake = False
        if _compat.channel_closing(self):
            self._put_back()
        raise Empty()  # the next pass records it with the next fetch

    def _fetched(self, reply: list[Any], keys: list[str], score: float, count: int) -> bool:
        taken, dead = reply
        self._popped = None
        self._wake = len(taken) // 3 + len(dead) // 2 < count  # the queues ran dry
        self.batch_qos.ramp_filled |= not self._wake
        for index, dead_key in zip(dead[::2], dead[1::2]):
            logger.error(
                "A message in queue %r is not a kombu message (JSON with a delivery tag, "
                "exchange and routing key): moved to the Redis list %r.",
                self._queue_of(keys[index - 3]), dead_key.decode())
        batch = [(self._queue_of(keys[index - 3]), payload, _text(tag))
                 for index, payload, tag in zip(taken[::3], taken[1::3], taken[2::3])]
        if _compat.channel_closing(self):
            for _queue, _payload, tag in batch:
                self.batch_qos.restore_by_tag(tag)
            raise Empty()
        if not batch:
            raise Empty()
        scored = repr(score)
        cycle = _compat.queue_cycle(self)
        for queue, payload, tag in batch:
            self.batch_qos.recorded[tag] = scored
            cycle.rotate(queue)
            try:
                _compat.deliver(self, json.loads(payload), queue)
            except self.lost_connection:
                raise
            except Exception as exc:  # noqa: BLE001 - kombu or Celery would stop the worker
                self._dead_letter(queue, tag, payload, exc)
        return True

    def _dead_letter(self, queue: str, tag: str, payload: bytes, exc: Exception) -> None:
        """Move a payload kombu or Celery could not take to the dead-letter list, logged."""
        dead = DEAD_LETTER.format(queue=queue)
        logger.error("A message in queue %r could not be delivered (%s: %s): moved to the Redis "
                     "list %r. It begins: %s", queue, type(exc).__name__, exc, dead,
                     excerpt(payload))
        self._raw_client().rpush(self.prefixed([dead])[0], payload)
        self.batch_qos.ack(tag)

    def _queue_of(self, key: str) -> str:
        return key.rsplit(self.sep, 1)[0]

    def _put_back(self) -> None:
        """Return what the wake-up popped to the head of its list, undelivered."""
        if self._popped is not None:
            key, payload = self._popped
            self._popped = None
            self.client.rpush(key, payload)

    # -- scripts ----------------------------------------------------------------------

    def prefixed(self, keys: list[str]) -> list[str]:
        return [self.global_keyprefix + key for key in keys] if self.global_keyprefix else keys

    def _sha(self, script: str) -> str:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = self._raw_client().script_load(script)
        return sha

    def _raw_client(self) -> redis.Redis:
        """A client on the channel's pool that leaves keys as given (we prefix them)."""
        return redis.Redis(connection_pool=self.pool)

    def run_script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` now, on a pooled connection, loading it again after NOSCRIPT."""
        client = self._raw_client()
        try:
            return client.evalsha(self._sha(script), len(keys), *self.prefixed(keys), *args)
        except redis.exceptions.NoScriptError:
            self._shas.pop(script, None)
            return client.evalsha(self._sha(script), len(keys), *self.prefixed(keys), *args)

    def close(self) -> None:
        if self.connection is not None and self.connection.client is None:
            # Celery's consumer collected the connection after it broke: kombu's restore
            # of delivered messages would rebuild a pool from the gone connection's
            # parameters and raise AttributeError. They stay in the unacked hash and
            # come back after visibility_timeout.
            self.qos.restore_at_shutdown = False
        if self.closed:
            super().close()
            return
        try:
            self.batch_qos.flush_acks(wait=True)
            self._put_back()
        except self.lost_connection:
            logger.warning("Could not send the last acks before closing the channel: the "
                           "messages will be redelivered after visibility_timeout.",
                           exc_info=True)
        super().close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with batched fetches and acks."""

    from_transport_options: tuple[str, ...] = (  # type: ignore[assignment, unused-ignore]
        *kombu_redis.SentinelChannel.from_transport_options, "fetch_limit",
        "visibility_budget")


_compat.bind_redis_poll(Channel, Channel.start_poll, Channel.read_poll)


class Transport(kombu_redis.Transport):
    """``broker_transport = "celery_asyncpool.broker:Transport"``."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """``broker_transport = "celery_asyncpool.broker:SentinelTransport"``."""

    Channel = SentinelChannel

