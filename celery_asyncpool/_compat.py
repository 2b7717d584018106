"""Every private name and undocumented behaviour of celery, kombu, billiard and asyncio we use.

Only this module reaches into those packages' internals (and CPython's
underscored ``sys`` functions); ``tests/unit/test_compat.py`` checks that no
other module names one. Each internal is listed in ``INTERNALS`` with where it
lives in the pinned releases (celery 5.7.0, kombu 5.7.0, billiard 4.3.2,
CPython 3.11-3.13) and what the pool does with it. ``check()`` resolves every
one; the worker calls it when the pool is built, so a release that renames one
fails at start-up with ``CompatibilityError`` naming the package, its version
and the missing name, instead of misbehaving later. The unit tests pin the
behaviour behind each name, so they fail first when a pinned release changes.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from types import CodeType, FrameType
from typing import Any

from .errors import CompatibilityError

# The attribute where Celery's ``autoretry_for`` keeps the task's own body, having
# replaced ``run`` with a sync wrapper that calls it (celery/app/autoretry.py:33-66).
AUTORETRY_BODY = "_orig_run"

# Methods of a result backend (and of app.amqp) that the pool overrides on one
# instance: see their entries in ``INTERNALS``.
STORE_RESULT = "_store_result"
BACKEND_SLEEP = "_sleep"
CALL_ERRBACKS = "_call_task_errbacks"
RETRY_PUBLISH = "_retry_publish"


@dataclass(frozen=True)
class Internal:
    """One name we rely on: its dotted path, where it is in the pinned release, and why."""

    path: str
    where: str
    why: str

    @property
    def package(self) -> str:
        return self.path.split(".", 1)[0]


INTERNALS: tuple[Internal, ...] = (
    Internal("celery._state._task_stack", "celery/_state.py:73",
             "current_task's stack, re-keyed by caller so coroutines see their task"),
    Internal("celery.utils.threads.LocalStack.__ident_func__", "celery/utils/threads.py:243-249",
             "the settable identity function of Celery's task and request stacks"),
    Internal("celery.concurrency.ALIASES", "celery/concurrency/__init__.py:11",
             "pool names that worker_pool and -P resolve: 'asyncsql' is added"),
    Internal("celery.bin.worker.WORKERS_POOL", "celery/bin/worker.py:57-64,123",
             "the -P choices, built when the module is imported: 'asyncsql' is added"),
    Internal("celery.bin.worker.worker", "celery/bin/worker.py:158-340",
             "the `celery worker` command, whose callback turns a bad setting into a "
             "one-line error"),
    Internal("celery.worker.control.Panel", "celery/worker/control.py:40-44,74",
             "registered remote commands: `inspect conf` and `inspect report` are "
             "re-registered to mask URL passwords"),
    Internal("celery.concurrency.base.BasePool._get_info", "celery/concurrency/base.py:158",
             "the pool's part of `inspect stats`, which TaskPool extends as the thread pool does"),
    Internal("celery.app.trace.build_tracer", "celery/app/trace.py:330-700",
             "rebuilds a bridged task's tracer"),
    Internal("celery.app.task.Task.__trace__", "celery/app/task.py:239, trace.py:706-708",
             "the tracer a worker child caches per task, replaced once the body is bridged"),
    Internal("celery.app.backends.by_url", "celery/app/backends.py:59",
             "the result backend class of a URL: a database backend joins the budget"),
    Internal("celery.concurrency.prefork.process_initializer", "celery/concurrency/prefork.py:47",
             "a child's Celery set-up: app finalize, tracers, worker_process_init"),
    Internal("celery.concurrency.prefork.process_destructor", "celery/concurrency/prefork.py:103",
             "a child's tear-down: worker_process_shutdown"),
    Internal("celery.concurrency.prefork._run_ready_callbacks",
             "celery/concurrency/prefork.py:123",
             "runs the acks_late acks queued on a stopped hub, at warm shutdown"),
    Internal("celery.backends.base.BaseKeyValueStoreBackend._store_result",
             "celery/backends/base.py:1355-1377",
             "a key-value backend's state write (read, then write): replaced on a Redis "
             "backend's instance by one script call that never replaces a SUCCESS"),
    Internal("celery.backends.base.Backend._get_result_meta", "celery/backends/base.py:770",
             "the stored meta of a state (result_extended included), built as Celery does"),
    Internal("celery.backends.base.Backend._sleep", "celery/backends/base.py:824",
             "result_backend_always_retry's wait, replaced in a tracer by an awaited sleep"),
    Internal("celery.backends.base.Backend._call_task_errbacks", "celery/backends/base.py:391",
             "a failure's errbacks (publishes), run off the loop in a tracer"),
    Internal("celery.backends.redis.RedisBackend._MAX_STR_VALUE_SIZE",
             "celery/backends/redis.py:496", "the largest value Celery stores in Redis"),
    Internal("celery.app.amqp.AMQP._retry_publish", "celery/app/amqp.py:299",
             "the tracer's publish of link callbacks and the next chain step, run off "
             "the loop in a tracer"),
    Internal("celery.local.Proxy._get_current_object", "celery/local.py:97",
             "the app behind celery.current_app, for session() outside a worker"),
    Internal("kombu.asynchronous.hub.Hub.fire_timers", "kombu/asynchronous/hub.py:195",
             "runs the stopped hub's timers (heartbeats) while the pool drains"),
    Internal("kombu.transport.redis.Channel._brpop_start", "kombu/transport/redis.py:1459",
             "how the Redis poller asks for messages: the broker transport sends its fetch "
             "script or its wake-up BRPOP there"),
    Internal("kombu.transport.redis.Channel._brpop_read", "kombu/transport/redis.py:1476",
             "how the Redis poller reads them (its handlers['BRPOP']): the transport reads "
             "a batch there"),
    Internal("kombu.transport.redis.Channel._in_poll", "kombu/transport/redis.py:1051,1467",
             "the connection a reply is pending on, which the poller waits for"),
    Internal("kombu.transport.redis.Channel._brpop_sent_at", "kombu/transport/redis.py:1052",
             "when the pending request went out: the poller's stale-connection check"),
    Internal("kombu.transport.redis.Channel._flush_brpop_reauth", "kombu/transport/redis.py:1563",
             "sends a pending re-auth token once the poll connection is idle"),
    Internal("kombu.transport.redis.Channel._update_queue_cycle",
             "kombu/transport/redis.py:1183,2114",
             "keeps the instance's _queue_cycle, the consumer's queue order "
             "(queue_order_strategy), which the transport consumes and rotates"),
    Internal("kombu.transport.redis.Channel._q_for_pri", "kombu/transport/redis.py:1665",
             "the key of a queue's priority step"),
    Internal("kombu.transport.redis.Channel._closing", "kombu/transport/redis.py:1042,1891",
             "set while the channel closes: a batch read then is restored, not delivered"),
    Internal("kombu.transport.virtual.base.Transport._deliver",
             "kombu/transport/virtual/base.py:1045",
             "hands a fetched message to the channel's consumer callback"),
    Internal("celery.worker.consumer.consumer.Consumer.create_task_handler",
             "celery/worker/consumer/consumer.py:798-861, called by celery/worker/loops.py:72,165",
             "builds the callback each task message goes through; an exception out of it "
             "stops the worker, so the pool wraps what it returns"),
    Internal("celery.app.utils.filter_hidden_settings", "celery/app/utils.py:194,472-488",
             "censors settings by key for `celery report`, `inspect conf`/`report` and "
             "conf.humanize(): a URL nested in asyncsql_databases passes it, so it is wrapped"),
    Internal("celery.worker.state.reserved_requests", "celery/worker/state.py:82,165-176",
             "the requests the worker holds: those not started count against the broker "
             "transport's visibility budget"),
    Internal("celery.worker.state.active_requests", "celery/worker/state.py:85,178-190",
             "the requests a pool slot runs: held, but no longer waiting"),
    Internal("billiard.reduction.DupFd", "billiard/reduction.py:227",
             "hands a pipe end to a spawned child"),
    Internal("billiard.pool.MaybeEncodingError", "billiard/pool.py:207",
             "the error prefork reports for an outcome that cannot be pickled"),
    Internal("asyncio.events._get_running_loop", "asyncio/events.py (CPython 3.11-3.13)",
             "the running loop or None, without raising, on the bridge's path"),
    Internal("asyncio.events.Handle._run", "asyncio/events.py:78 (CPython 3.11-3.13)",
             "the frame every loop callback runs in: where the watchdog's stack ends"),
    Internal("ctypes.pythonapi.PyThreadState_SetAsyncExc", "CPython C API (pystate.c)",
             "raises the soft time limit in the thread running a sync task"),
    Internal("sys._getframe", "CPython", "the watchdog finds the frames that run the loop"),
    Internal("sys._current_frames", "CPython", "the watchdog reads the blocked loop's stack"),
)


def _resolve(path: str) -> Any:
    """The object at ``path``, importing the longest importable prefix."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            target = getattr(target, name)
        return target
    raise ImportError(path)


def _version(package: str) -> str:
    if package in ("asyncio", "ctypes", "sys"):
        return f"Python {sys.version.split()[0]}"
    try:
        return f"{package} {version(package)}"
    except PackageNotFoundError:
        return f"{package} (version unknown)"


def check(internals: tuple[Internal, ...] = INTERNALS) -> None:
    """Resolve every internal we rely on.

    Raises:
        CompatibilityError: naming each one missing, its package's version, and
            where it was in the release the pool was built against.
    """
    missing = []
    for internal in internals:
        try:
            _resolve(internal.path)
        except (ImportError, AttributeError):
            missing.append(f"{internal.path} (in {_version(internal.package)}; was at "
                           f"{internal.where}: {internal.why})")
    if missing:
        raise CompatibilityError(
            "celery_asyncpool relies on internals that this installation lacks: "
            + "; ".join(missing) + ". Install the versions pinned in celery_asyncpool's "
            "requirements (celery 5.7, kombu 5.7, billiard 4.3), or report the new release.")


# --- Celery --------------------------------------------------------------------------------

def task_stack() -> Any:
    """Celery's ``current_task`` stack (a ``LocalStack``)."""
    from celery import _state

    return getattr(_state, "_task_stack")  # not in celery-types' stubs


def set_stack_identity(stack: Any, ident: Callable[[], Any]) -> None:
    """Key ``stack`` (a Celery ``LocalStack``) by ``ident()`` instead of the thread.

    Raises:
        CompatibilityError: the stack has no settable identity function.
    """
    if not hasattr(type(stack), "__ident_func__"):
        raise CompatibilityError(
            f"{type(stack).__module__}.{type(stack).__name__} has no __ident_func__ "
            f"({_version('celery')}): this Celery keys task requests differently, so async "
            "tasks cannot see self.request. Unset USE_FAST_LOCALS, or pin celery<5.8.")
    stack.__ident_func__ = ident


def pool_aliases() -> dict[str, str]:
    """Celery's pool names (``worker_pool``, ``-P``) and the classes they stand for."""
    from celery import concurrency

    aliases: dict[str, str] = getattr(concurrency, "ALIASES")  # as above
    return aliases


def worker_cli() -> Any | None:
    """``celery.bin.worker`` if the ``celery`` command has imported it, else None."""
    return sys.modules.get("celery.bin.worker")


def extend_pool_choices(worker_cli: Any, name: str) -> None:
    """Add ``name`` to the ``-P`` choices that ``celery.bin.worker`` built at import.

    Raises:
        CompatibilityError: the choices are no longer kept where this extends them.
    """
    option: Any = getattr(worker_cli, "WORKERS_POOL", None)
    choices = getattr(option, "choices", None)
    if not isinstance(choices, (list, tuple)):
        raise CompatibilityError(
            f"celery.bin.worker.WORKERS_POOL no longer holds the -P choices "
            f"({_version('celery')}), so `-P {name}` cannot be offered; set "
            f"worker_pool = '{name}' in the Celery config instead.")
    if name not in choices:
        option.choices = (*choices, name)


def wrap_worker_command(worker_cli: Any, wrap: Callable[[Any], Any]) -> None:
    """Replace the ``celery worker`` command's callback by ``wrap(callback)``, once.

    Raises:
        CompatibilityError: ``celery.bin.worker.worker`` is no longer a click command.
    """
    command: Any = getattr(worker_cli, "worker", None)
    callback = getattr(command, "callback", None)
    if callback is None:
        raise CompatibilityError(
            f"celery.bin.worker.worker is no longer a click command ({_version('celery')}).")
    if not getattr(callback, "wrapped_by_asyncsql", False):
        command.callback = wrap(callback)
        command.callback.wrapped_by_asyncsql = True


def inspect_command(name: str) -> tuple[Callable[..., Any], Any]:
    """The handler of remote command ``name`` and its registration info.

    Raises:
        CompatibilityError: Celery no longer registers that command.
    """
    from celery.worker import control

    handler = control.Panel.data.get(name)
    info = control.Panel.meta.get(name)
    if handler is None or info is None:
        raise CompatibilityError(
            f"celery.worker.control no longer registers the `{name}` inspect command "
            f"({_version('celery')}) whose reply celery_asyncpool masks, so it could show "
            "database passwords from asyncsql_databases. Pin celery<5.8.")
    return handler, info


def register_inspect_command(name: str, handler: Callable[..., Any], info: Any) -> None:
    """Register ``handler`` as inspect command ``name``, with the registration ``info`` it had."""
    from celery.worker import control

    control.inspect_command(
        name=name, alias=info.alias, signature=info.signature, args=info.args,
        default_timeout=info.default_timeout, help=info.help)(handler)


def wrap_task_handler(consumer: Any, wrap: Callable[[Callable[[Any], Any]], Any]) -> None:
    """Have ``consumer`` pass each task handler it builds through ``wrap``, from now on.

    The consumer builds the handler again each time it (re)starts its loop.

    Raises:
        CompatibilityError: the consumer no longer builds its task handler this way.
    """
    create = getattr(consumer, "create_task_handler", None)
    if not callable(create):
        raise CompatibilityError(
            f"celery {version('celery')}: the worker's consumer has no create_task_handler; "
            "celery_asyncpool cannot keep a malformed message from stopping the worker")
    if getattr(create, "wraps_task_handler", False):
        return

    @functools.wraps(create)
    def create_wrapped(*args: Any, **kwargs: Any) -> Any:
        return wrap(create(*args, **kwargs))

    create_wrapped.wraps_task_handler = True  # type: ignore[attr-defined]
    consumer.create_task_handler = create_wrapped


def wrap_hidden_settings_filter(mask: Callable[[Any], Any]) -> None:
    """Pass what Celery's censored settings views return through ``mask`` too.

    Raises:
        CompatibilityError: Celery no longer censors settings with this function.
    """
    from celery.app import utils

    original = getattr(utils, "filter_hidden_settings", None)
    if not callable(original):
        raise CompatibilityError(
            f"celery {version('celery')}: celery.app.utils has no filter_hidden_settings; "
            "celery_asyncpool cannot mask database URLs in `celery report`")
    if getattr(original, "masks_urls", False):
        return

    @functools.wraps(original)
    def filtered(conf: Any) -> Any:
        return mask(original(conf))

    filtered.masks_urls = True  # type: ignore[attr-defined]
    utils.filter_hidden_settings = filtered


def autoscale_of(worker: Any) -> tuple[Any, Any]:
    """``(worker.autoscale, worker.max_concurrency)`` as the Autoscaler step sets them
    (celery/worker/components.py:125-127); None for what the worker lacks."""
    return getattr(worker, "autoscale", None), getattr(worker, "max_concurrency", None)


def rebuild_tracer(name: str, task: Any, app: Any, hostname: str) -> None:
    """Build ``task``'s tracer anew, after its body was replaced, as the worker caches it."""
    from celery.app.trace import build_tracer

    task.__trace__ = build_tracer(name, task, app.loader, hostname, app=app)


def result_meta(backend: Any, result: Any, state: str, traceback: Any,
                request: Any) -> dict[str, Any]:
    """The meta Celery stores for a state, ``result_extended`` included."""
    meta: dict[str, Any] = backend._get_result_meta(
        result=result, state=state, traceback=traceback, request=request)
    return meta


def max_redis_value(backend: Any) -> int:
    """The longest value Celery's Redis backend agrees to store."""
    return int(backend._MAX_STR_VALUE_SIZE)


def backend_class(url: str) -> tuple[Any, str | None]:
    """The result backend class a ``result_backend`` URL selects, and the URL it keeps."""
    from celery.app.backends import by_url

    found: Any = by_url(url)  # celery-types has it return the class alone
    return tuple(found)  # type: ignore[return-value, unused-ignore]


def process_initializer(app: Any, hostname: str) -> None:
    """Celery's own set-up of a pool child, as prefork runs it."""
    from celery.concurrency import prefork

    prefork.process_initializer(app, hostname)


def process_destructor(pid: int, exitcode: int) -> None:
    """Celery's own tear-down of a pool child (``worker_process_shutdown``)."""
    from celery.concurrency import prefork

    prefork.process_destructor(pid, exitcode)


def flush_stopped_hub(hub: Any) -> None:
    """Run the timers and the queued acks of the worker's hub after it stopped.

    Raises:
        CompatibilityError: either is gone; acks_late tasks would stay unacked
            at warm shutdown, so this never skips silently.
    """
    from celery.concurrency import prefork

    run_ready_callbacks = getattr(prefork, "_run_ready_callbacks", None)
    fire_timers = getattr(hub, "fire_timers", None)
    if run_ready_callbacks is None or fire_timers is None:
        raise CompatibilityError(
            f"celery.concurrency.prefork._run_ready_callbacks or Hub.fire_timers is gone "
            f"({_version('celery')}, {_version('kombu')}): acks_late tasks that finish during "
            "a warm shutdown would not be acked. Pin celery<5.8 and kombu<5.8.")
    fire_timers()
    run_ready_callbacks(hub)


def current_app() -> Any:
    """The app behind Celery's ``current_app`` proxy."""
    from celery import current_app as proxy

    return getattr(proxy, "_get_current_object")()  # not in celery-types' stubs


# --- kombu's Redis transport ----------------------------------------------------------------

def bind_redis_poll(channel_class: type, start: Callable[..., None],
                    read: Callable[..., Any]) -> None:
    """Make ``start`` and ``read`` how kombu's Redis poller asks for and reads messages.

    The poller calls ``_brpop_start`` when the channel may consume and nothing
    is pending, and ``_brpop_read`` (``handlers['BRPOP']``) when the reply is
    readable.
    """
    setattr(channel_class, "_brpop_start", start)
    setattr(channel_class, "_brpop_read", read)


def mark_poll_sent(channel: Any, connection: Any) -> None:
    """Tell kombu's poller a reply is pending on ``connection`` from now, on the clock its
    stale-connection check reads (the module's ``monotonic``)."""
    from kombu.transport import redis

    channel._in_poll = connection
    channel._brpop_sent_at = getattr(redis, "monotonic")()


def poll_done(channel: Any) -> None:
    """Tell kombu's poller the reply was read, and let it re-authenticate if it must."""
    channel._in_poll = None
    channel._flush_brpop_reauth()


def queue_cycle(channel: Any) -> Any:
    """The channel's queue order (``queue_order_strategy``): ``consume(n)``, ``rotate(q)``."""
    return channel._queue_cycle


def queue_key(channel: Any, queue: str, priority: int) -> str:
    """The Redis list of ``queue``'s priority step ``priority`` (without the global prefix)."""
    key: str = channel._q_for_pri(queue, priority)
    return key


def channel_closing(channel: Any) -> bool:
    """Whether the channel is closing (``Channel.close`` reads the last reply then)."""
    return bool(channel._closing)


def deliver(channel: Any, payload: dict[str, Any], queue: str) -> None:
    """Hand a fetched message to the consumer callback of ``queue``, as kombu's poller does."""
    channel.connection._deliver(payload, queue)


def waiting_requests() -> int:
    """Tasks this worker process holds that wait for a pool slot.

    Celery reserves a request when it may start (an ETA task when it is due) and
    marks it active when a slot takes it; both sets drop it when it ends. Zero
    outside a Celery worker: a plain kombu consumer holds no requests.
    """
    from celery.worker import state

    return max(0, len(state.reserved_requests) - len(state.active_requests))


def forget_requests_of(message: Any) -> None:
    """Drop what Celery's worker state holds for ``message``: a request reserved for it
    before its handling failed would count as waiting for a slot forever."""
    from celery.worker import state

    for request in list(state.reserved_requests):
        if getattr(request, "message", None) is message:
            state.task_ready(request)


def redis_socket(connection: Any) -> Any:
    """The socket of a connected redis-py ``Connection``, or None.

    redis-py has no public name for it; kombu's own poller reads the same
    attribute to register the socket with the hub (kombu/transport/redis.py:703).
    """
    return getattr(connection, "_sock", None)


# --- billiard ------------------------------------------------------------------------------

def dup_fd_for_spawn(fd: int) -> Any:
    """A picklable handle that makes billiard pass ``fd`` to a spawned child."""
    from billiard import reduction

    return reduction.DupFd(fd)


def maybe_encoding_error(exc: BaseException, value: Any) -> BaseException:
    """The error prefork reports for an outcome that cannot be pickled."""
    from billiard.pool import MaybeEncodingError

    error: BaseException = MaybeEncodingError(exc, value)
    return error


# --- asyncio and CPython -------------------------------------------------------------------

running_loop: Callable[[], asyncio.AbstractEventLoop | None] = asyncio.events._get_running_loop


def loop_callback_code() -> CodeType:
    """The code object of ``Handle._run``: every asyncio loop callback and Task step."""
    return asyncio.events.Handle._run.__code__


def current_frame() -> FrameType:
    """The caller's own frame."""
    return sys._getframe(1)


def thread_frames() -> dict[int, FrameType]:
    """The current frame of each thread, by thread id."""
    return sys._current_frames()


def set_async_exc(thread_id: int, exc_type: type[BaseException] | None) -> bool:
    """Raise ``exc_type`` in thread ``thread_id`` at its next instruction; None withdraws it.

    Returns whether the thread was found.

    Raises:
        CompatibilityError: the interpreter touched more than one thread
            (withdrawn before raising, as the C API asks).
    """
    exc = None if exc_type is None else ctypes.py_object(exc_type)
    changed = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exc)
    if changed > 1:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
        raise CompatibilityError(
            f"PyThreadState_SetAsyncExc changed {changed} threads for thread id {thread_id}.")
    return bool(changed == 1)
