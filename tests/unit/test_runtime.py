"""The child runtime without Celery's worker: one loop, the bridge, cancellation.

Each test runs against both ways of driving the loop: on a thread of its own
(eager mode) and on the calling main thread (a worker child).
"""

import asyncio
import signal
import threading

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import text

from celery_asyncpool import BridgeError, engine, session
from celery_asyncpool.child.runtime import Runtime
from celery_asyncpool.config import Settings
from celery_asyncpool.context import install
from celery_asyncpool.databases.engines import Sizing
from celery_asyncpool.errors import TaskCancelledError


def _running(tmp_path, own_thread):
    settings = Settings.from_conf({
        "asyncsql_database_url": f"sqlite+aiosqlite:///{tmp_path}/unit.db",
        "asyncsql_cancel_grace_s": 2,
    })
    soft_limit_handler = signal.getsignal(signal.SIGUSR1)
    runtime = Runtime(settings, Sizing(1, 1, 80), own_thread=own_thread)
    runtime.start()
    yield runtime
    runtime.stop()
    signal.signal(signal.SIGUSR1, soft_limit_handler)


@pytest.fixture(params=["own thread", "caller's thread"])
def runtime(request, tmp_path):
    yield from _running(tmp_path, own_thread=request.param == "own thread")


@pytest.fixture
def threaded_runtime(tmp_path):
    """Eager mode's runtime: the loop on a thread of its own."""
    yield from _running(tmp_path, own_thread=True)


@pytest.fixture
def child_runtime(tmp_path):
    """A worker child's runtime: the loop driven by the main thread."""
    yield from _running(tmp_path, own_thread=False)


def test_coroutines_share_one_loop_on_its_own_thread(runtime):
    async def where():
        return asyncio.get_running_loop(), threading.current_thread().name

    first, second = runtime.run(where()), runtime.run(where())
    thread = "asyncsql-loop" if runtime._thread is not None else "MainThread"
    assert first == second == (runtime.loop, thread)


def test_session_and_engine_work_on_the_runtime_loop(runtime):
    async def query():
        async with session() as s:
            value = (await s.execute(text("SELECT 41 + 1"))).scalar_one()
        return value, engine().pool.size()

    assert runtime.run(query()) == (42, 1)


def test_exceptions_cross_the_bridge_unchanged(runtime):
    async def fail():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        runtime.run(fail())


def test_running_on_the_loop_thread_is_refused(runtime):
    async def nested():
        inner = asyncio.sleep(0)
        with pytest.raises(BridgeError, match="await the coroutine instead"):
            runtime.run(inner)
        return "refused"

    assert runtime.run(nested()) == "refused"


def test_a_cancellation_the_pool_did_not_ask_for_is_a_task_error(runtime):
    async def cancelled():
        raise asyncio.CancelledError("somebody else")

    with pytest.raises(TaskCancelledError, match="somebody else"):
        runtime.run(cancelled())


async def _slow(unwound):
    try:
        await asyncio.sleep(30)
    finally:
        unwound.append(True)


async def _careful():
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError as exc:
        return f"cleaned up after: {exc.args[0]}"


def _soft_limit_in(seconds):
    def handler(signum, frame):
        raise SoftTimeLimitExceeded()
    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    return previous


def test_soft_limit_cancels_the_coroutine_at_its_await(runtime):
    unwound = []

    previous = _soft_limit_in(0.2)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            runtime.run(_slow(unwound))
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert unwound == [True]


def test_a_coroutine_may_handle_the_soft_limit(threaded_runtime):
    runtime = threaded_runtime

    previous = _soft_limit_in(0.2)
    try:
        outcome = runtime.run(_careful())
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcome == "cleaned up after: celery_asyncpool: soft time limit exceeded"


def test_request_identity_follows_the_caller_onto_the_loop(runtime):
    app = Celery("unit", set_as_current=False)

    @app.task(bind=True, name=f"probe-{id(runtime)}")
    def probe(self):
        async def inside():
            before = self.request.id
            await asyncio.sleep(0)
            return before, self.request.id, await asyncio.to_thread(lambda: self.request.id)
        return runtime.run(inside())

    install(app)
    assert probe.apply(task_id="abc-123").get() == ("abc-123",) * 3


@pytest.mark.parametrize("own_thread", [True, False])
def test_stop_disposes_engines_and_closes_the_loop(tmp_path, own_thread):
    settings = Settings.from_conf({"asyncsql_database_url": f"sqlite+aiosqlite:///{tmp_path}/x.db"})
    runtime = Runtime(settings, Sizing(1, 1, 80), own_thread=own_thread)
    runtime.start()

    async def use():
        async with engine().connect() as conn:
            await conn.execute(text("SELECT 1"))
        return engine().pool.checkedin()

    assert runtime.run(use()) == 1
    built = runtime.databases.engine("default")
    runtime.stop()
    assert runtime.loop.is_closed()
    assert built.pool.checkedin() == 0


def test_terminate_mid_coroutine_unwinds_it_and_leaves_the_loop_closable(child_runtime):
    def terminate(signum, frame):
        raise SystemExit(-15)

    previous = signal.signal(signal.SIGALRM, terminate)
    unwound = []

    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(SystemExit):
            child_runtime.run(_slow(unwound))
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert unwound == [True]
    child_runtime.stop()
    assert child_runtime.loop.is_closed()


def test_a_soft_limit_reaches_a_thread_waiting_on_the_loop(threaded_runtime):
    """As a sync task's thread is interrupted by its soft limit while it waits on an async
    body: the limit arrives while it waits, and the body is cancelled at its ``await``."""
    from celery_asyncpool import _compat

    body_started, outcome = threading.Event(), []

    async def body():
        body_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError as exc:
            outcome.append(f"body cancelled: {exc.args[0]}")
            raise

    def sync_task():
        try:
            threaded_runtime.run(body())
        except SoftTimeLimitExceeded:
            outcome.append("SoftTimeLimitExceeded")

    thread = threading.Thread(target=sync_task)
    thread.start()
    assert body_started.wait(5)
    assert _compat.set_async_exc(thread.ident, SoftTimeLimitExceeded)
    thread.join(10)
    assert not thread.is_alive(), "the limit waited for the 30 s body"
    assert outcome == ["body cancelled: celery_asyncpool: soft time limit exceeded",
                       "SoftTimeLimitExceeded"]


def test_a_coroutine_cancelled_before_its_hand_over_started_never_runs(threaded_runtime):
    """An interrupt can land in the waiting thread as the hand-over is being made: the cancel
    then reaches the loop first, and the body is closed unstarted, not left running."""
    from celery_asyncpool.child.runtime import _Handoff

    ran = []

    async def body():
        ran.append(True)

    job = _Handoff(body(), threaded_runtime.loop)
    threaded_runtime.loop.call_soon_threadsafe(job.cancel, "interrupted")
    threaded_runtime.loop.call_soon_threadsafe(job.start)
    assert isinstance(job.done.exception(timeout=5), asyncio.CancelledError)
    assert ran == [] and job.task is None


def test_a_bridged_body_keeps_the_signature_retry_binds_arguments_to(runtime):
    """``Task.retry(kwargs=...)`` binds the request's args to ``inspect.signature(task.run)``."""
    import inspect

    from celery_asyncpool.child.bridge import _bridge

    class Body:
        async def run(self, foo, bar):
            return foo, bar

    # A decorator may leave a __signature__ on the function, naming its ``self``.
    Body.run.__signature__ = inspect.signature(Body.run)
    bridged = _bridge(Body().run, runtime)
    assert str(inspect.signature(bridged)) == "(foo, bar)"
    assert bridged(1, bar=2) == (1, 2)  # outside a tracer: run on the loop, waited for
