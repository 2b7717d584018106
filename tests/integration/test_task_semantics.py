"""Rows 5-8 of DESIGN.md: what an async task sees and does is what a sync task does on prefork.

Every test runs twice against a real worker on Redis: ``-P asyncsql`` with the
``async def`` task, and stock prefork with its sync twin, with the same
expectations. Signal receivers in ``tasks_semantics`` record each attempt's
events in Redis.
"""

import re
import time

import pytest

from . import tasks_semantics as ts
from .conftest import run_worker

INCLUDE = "tests.integration.tasks,tests.integration.tasks_semantics"


@pytest.fixture(scope="module", params=["asyncsql", "asyncsql-one-child", "prefork"])
def pool(request):
    """``asyncsql-one-child``: 8 slots in a single child, so the tasks interleave on one loop."""
    return request.param


@pytest.fixture(scope="module")
def worker(pool, tmp_path_factory):
    one_child = pool == "asyncsql-one-child"
    with run_worker(tmp_path_factory.mktemp(pool), pool=pool.split("-")[0],
                    concurrency=8 if one_child else 2, include=INCLUDE,
                    conf={"asyncsql_processes": 1} if one_child else None) as started:
        yield started


@pytest.fixture
def twin(pool):
    """The task named ``name`` for this pool: ``async_<name>``, or ``sync_<name>`` for prefork."""
    prefix = "sync" if pool == "prefork" else "async"
    return lambda name: getattr(ts, f"{prefix}_{name}")


def wait_for(predicate, what, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(0.05)
    return value


def recorded(task_id, expected, timeout_s=30):
    """Each attempt's events, once they equal ``expected`` or the time is up; plus one more
    attempt, which must be empty."""
    def read():
        return [ts.events(task_id, attempt) for attempt in range(len(expected) + 1)]
    deadline = time.monotonic() + timeout_s
    while (got := read()) != [*expected, []] and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def attempt_events(retries, end):
    """The events of attempt ``retries``: prerun, the body, then ``end``."""
    return [f"prerun:{retries}", f"body:{retries}", *end]


def retried(retries):
    """The events of an attempt that calls self.retry(): re-publish, task_retry, postrun."""
    return attempt_events(retries, [f"publish:{retries + 1}", "retry", "postrun:RETRY"])


def test_request_identity_and_log_task_ids_around_awaits(worker, twin):
    """24 tasks at once on -c 2, each retried once: before and after every await (and inside
    asyncio.to_thread) a task sees its own request.id, request.retries and current_task, and
    get_task_logger records carry its own task name and id."""
    task = twin("identity")
    results = {token: worker.send(task, token) for token in range(24)}
    for result in results.values():
        seen = result.get(timeout=30)
        half = len(seen) // 2
        assert half >= 2
        assert seen == ([[result.id, 0, result.id, task.name]] * half
                        + [[result.id, 1, result.id, task.name]] * half)

    pattern = re.compile(
        rf"{re.escape(task.name)}\[([0-9a-f-]{{36}})\]: identity token=(\d+) attempt=(\d) (\w+)")
    logged = {}
    for task_id, token, attempt, step in pattern.findall(worker.logs()):
        logged.setdefault(int(token), []).append((task_id, int(attempt), step))
    assert logged == {
        token: [(result.id, 0, "before"), (result.id, 0, "after"),
                (result.id, 1, "before"), (result.id, 1, "after")]
        for token, result in results.items()
    }


def test_task_signals_fire_once_per_attempt_in_order(worker, twin):
    """task_prerun, the body, task_success / task_failure / task_retry (after the retry's
    re-publish), then task_postrun with the state: once each, in this order."""
    task = twin("outcome")
    expected = {
        "succeed": [attempt_events(0, ["success", "postrun:SUCCESS"])],
        "fail": [attempt_events(0, ["failure:ValueError", "postrun:FAILURE"])],
        "retry_once": [retried(0), attempt_events(1, ["success", "postrun:SUCCESS"])],
    }
    results = {mode: worker.send(task, mode) for mode in expected}
    for mode, result in results.items():
        result.get(timeout=30, propagate=False)
        assert recorded(result.id, expected[mode]) == [*expected[mode], []], mode


def test_retry_republishes_until_max_retries_then_fails(worker, twin):
    """self.retry(exc=...) re-publishes the task with retries + 1; after max_retries (2) the
    exception given is stored as FAILURE."""
    result = worker.send(twin("outcome"), "retry_forever")
    with pytest.raises(ValueError, match="attempt 2"):
        result.get(timeout=30)
    assert result.state == "FAILURE"
    assert result.retries == 2
    expected = [retried(0), retried(1),
                attempt_events(2, ["failure:ValueError", "postrun:FAILURE"])]
    assert recorded(result.id, expected) == [*expected, []]


def test_autoretry_for_retries_an_exception_raised_after_an_await(worker, twin):
    """autoretry_for=(KeyError,): a KeyError raised by the body is retried like self.retry()."""
    result = worker.send(twin("outcome"), "autoretry")
    assert result.get(timeout=30) == 2
    expected = [retried(0), retried(1), attempt_events(2, ["success", "postrun:SUCCESS"])]
    assert recorded(result.id, expected) == [*expected, []]


def test_reject_without_requeue_fails_the_task_and_drops_the_message(worker, twin):
    """Reject(requeue=False): FAILURE with the Reject stored, the message is not redelivered."""
    result = worker.send(twin("outcome"), "reject")
    assert type(result.get(timeout=30, propagate=False)).__name__ == "Reject"
    assert result.state == "FAILURE"
    expected = [attempt_events(0, ["postrun:REJECTED", "failure:Reject"])]
    assert recorded(result.id, expected) == [*expected, []]
    wait_for(lambda: result.id not in ts.unacked_task_ids(), "the message to leave 'unacked'")


def test_ignore_stores_nothing_and_acks(worker, twin):
    """Ignore(): no result is stored (the state stays PENDING) and the message is acked."""
    result = worker.send(twin("outcome"), "ignore")
    expected = [attempt_events(0, ["postrun:IGNORED"])]
    assert recorded(result.id, expected) == [*expected, []]
    wait_for(lambda: result.id not in ts.unacked_task_ids(), "the message to leave 'unacked'")
    assert result.state == "PENDING"


def test_acks_late_message_stays_unacked_until_the_result_is_stored(worker, twin):
    """acks_late=True: while the task runs, and still at task_postrun when its result is
    already stored, the message is unacked (redelivered if the worker dies); then it is acked."""
    result = worker.send(twin("hold"))
    try:
        wait_for(lambda: ts.events(result.id, 0) == ["prerun:0", "started"], "the task to start")
        assert result.id in ts.unacked_task_ids()
    finally:
        ts.client().set(ts.release_key(result.id), 1, ex=600)
    assert result.get(timeout=30) == "released"
    wait_for(lambda: result.id not in ts.unacked_task_ids(), "the ack after the result")
    assert ts.events(result.id, 0) == [
        "prerun:0", "started", "success", "postrun:SUCCESS:stored=SUCCESS:unacked=True"]
