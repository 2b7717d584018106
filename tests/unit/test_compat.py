"""Each internal ``_compat`` relies on: present in the pinned releases, behaving as the pool
expects, and, when gone, a start-up error naming it and its package's version."""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time

import click
import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from celery_asyncpool import _compat, registration
from celery_asyncpool.errors import CompatibilityError, ConfigurationError

# The internals whose owner the test can safely take them from (not sys, asyncio, ctypes).
REMOVABLE = [i for i in _compat.INTERNALS if i.package in ("celery", "kombu", "billiard")]


def test_every_internal_is_there_in_the_pinned_releases():
    _compat.check()


@pytest.mark.parametrize("internal", REMOVABLE, ids=lambda i: i.path)
def test_a_release_without_it_fails_at_start_up_naming_it_and_the_version(monkeypatch,
                                                                          internal):
    owner_path, name = internal.path.rsplit(".", 1)
    monkeypatch.delattr(_compat._resolve(owner_path), name)
    with pytest.raises(CompatibilityError, match=rf"{internal.path} \(in {internal.package} "
                                                 rf"\d+\.\d+\.\d+; was at "):
        _compat.check()


def test_a_missing_interpreter_internal_is_named_with_the_python_version():
    gone = _compat.Internal("sys._getframe_gone", "CPython", "why")
    with pytest.raises(CompatibilityError, match=r"sys\._getframe_gone \(in Python 3\."):
        _compat.check((gone,))


def test_the_task_stack_takes_an_identity_function():
    stack = _compat.task_stack()
    original = stack.__ident_func__
    try:
        _compat.set_stack_identity(stack, lambda: "caller")
        stack.push("request")
        seen = []
        thread = threading.Thread(target=lambda: seen.append(stack.top))
        thread.start()
        thread.join()
        assert seen == ["request"]  # another thread, the same caller: the same stack
        stack.pop()
    finally:
        _compat.set_stack_identity(stack, original)


def test_a_stack_without_an_identity_function_is_refused():
    with pytest.raises(CompatibilityError, match="has no __ident_func__"):
        _compat.set_stack_identity(object(), lambda: None)


def test_the_pool_name_and_the_cli_choice_are_registered():
    worker_cli = importlib.import_module("celery.bin.worker")
    registration.register()
    assert _compat.pool_aliases()["asyncsql"] == "celery_asyncpool.pool:TaskPool"
    assert "asyncsql" in worker_cli.WORKERS_POOL.choices


def test_the_worker_command_prints_a_bad_setting_as_a_click_error():
    worker_cli = importlib.import_module("celery.bin.worker")
    registration.register()
    callback = worker_cli.worker.callback
    assert callback.wrapped_by_asyncsql
    registration.register()
    assert worker_cli.worker.callback is callback  # wrapped once

    def bad(*args, **kwargs):
        raise ConfigurationError("Setting asyncsql_processes has value 0; expected ...")

    wrapped = registration._configuration_errors_as_click_errors(bad)
    with pytest.raises(click.ClickException, match="asyncsql_processes has value 0"):
        wrapped()


@pytest.mark.parametrize("name", registration.MASKED_COMMANDS)
def test_the_masked_inspect_commands_are_registered(name):
    handler, info = _compat.inspect_command(name)
    assert callable(handler) and info.type == "inspect"


def test_autoretry_keeps_the_async_body_where_the_bridge_looks():
    app = Celery("compat", set_as_current=False)

    @app.task(autoretry_for=(ValueError,))
    async def body():
        return 1

    assert asyncio.iscoroutinefunction(getattr(body, _compat.AUTORETRY_BODY))
    assert not asyncio.iscoroutinefunction(body.run)


def test_the_rebuilt_tracer_is_the_one_celery_runs():
    app = Celery("compat", set_as_current=False)

    @app.task
    def add(x, y):
        return x + y

    _compat.rebuild_tracer(add.name, add, app, "host")
    retval = add.__trace__("id-1", (1, 2), {}, {})
    assert retval.retval == 3


def test_the_backend_class_of_a_url():
    backend, _ = _compat.backend_class("redis://127.0.0.1/0")
    assert backend.__name__ == "RedisBackend"


def test_the_current_app_is_the_object_behind_the_proxy():
    app = Celery("compat-current")
    assert _compat.current_app() is app


def test_a_stopped_hub_without_its_flush_fails_loudly(monkeypatch):
    from celery.concurrency import prefork
    from kombu.asynchronous import Hub

    monkeypatch.delattr(prefork, "_run_ready_callbacks")
    with pytest.raises(CompatibilityError, match="would not be acked"):
        _compat.flush_stopped_hub(Hub())


def test_a_stopped_hub_runs_its_queued_acks():
    from kombu.asynchronous import Hub
    from kombu.message import Message
    from vine import promise

    class Channel:
        no_ack_consumers = None
        acked: list[int] = []

        def basic_ack(self, delivery_tag, multiple=False):
            self.acked.append(delivery_tag)

    hub = Hub()
    message = Message(body=b"", delivery_tag=7, channel=Channel())
    hub.call_soon(promise(message.ack_log_error, (logging.getLogger(), (Exception,))))
    _compat.flush_stopped_hub(hub)
    assert Channel.acked == [7]


def test_the_running_loop_without_raising():
    assert _compat.running_loop() is None

    async def inside():
        return _compat.running_loop() is asyncio.get_running_loop()

    assert asyncio.run(inside())


def test_every_loop_callback_runs_in_the_handle_code():
    seen = []

    def callback():
        frame = _compat.current_frame()
        while frame is not None:
            seen.append(frame.f_code)
            frame = frame.f_back

    loop = asyncio.new_event_loop()
    loop.call_soon(callback)
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()
    assert _compat.loop_callback_code() in seen


def test_an_exception_is_raised_in_another_thread_and_its_frames_are_read():
    started, outcome = threading.Event(), []

    def spin():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pass

    def busy():
        # The loop in a frame of its own, as a task body is below the tracer's: on Python
        # 3.13.0 an exception raised at a loop's back edge can miss a try in the same frame.
        try:
            started.set()
            spin()
            outcome.append("not interrupted")
        except SoftTimeLimitExceeded:
            outcome.append("interrupted")

    thread = threading.Thread(target=busy)
    thread.start()
    started.wait(5)
    assert thread.ident in _compat.thread_frames()
    assert _compat.set_async_exc(thread.ident, SoftTimeLimitExceeded)
    thread.join(5)
    assert outcome == ["interrupted"]
    assert not _compat.set_async_exc(thread.ident, SoftTimeLimitExceeded)  # gone: not found


def test_billiards_errors_and_handles():
    from billiard.pool import MaybeEncodingError

    assert isinstance(_compat.maybe_encoding_error(ValueError("x"), object()), MaybeEncodingError)


def test_a_request_waits_from_reserved_until_a_slot_accepts_it():
    """Celery's worker state: reserved when it may start, active when a slot takes it."""
    from celery.worker import state

    class Request:
        id, name = "t", "t"

    request = Request()
    assert _compat.waiting_requests() == 0
    state.task_reserved(request)
    assert _compat.waiting_requests() == 1
    state.task_accepted(request)
    assert _compat.waiting_requests() == 0
    state.task_ready(request)
    assert _compat.waiting_requests() == 0 and request not in state.reserved_requests


def test_the_consumers_task_handler_is_wrapped_each_time_it_is_built():
    from celery.worker.consumer.consumer import Consumer

    assert callable(Consumer.create_task_handler)

    class FakeConsumer:
        def create_task_handler(self):
            return lambda message: message * 2

    consumer = FakeConsumer()
    _compat.wrap_task_handler(consumer, lambda handler: lambda m: handler(m) + 1)
    _compat.wrap_task_handler(consumer, lambda handler: lambda m: handler(m) + 100)  # no-op
    assert consumer.create_task_handler()(5) == 11
    assert consumer.create_task_handler()(1) == 3, "built anew after a reconnect, wrapped too"


def test_a_request_reserved_for_a_message_is_forgotten():
    from celery.worker import state

    class Request:
        id, name = "r", "r"
        message = object()

    request = Request()
    state.task_reserved(request)
    _compat.forget_requests_of(object())
    assert request in state.reserved_requests
    _compat.forget_requests_of(request.message)
    assert request not in state.reserved_requests and _compat.waiting_requests() == 0
