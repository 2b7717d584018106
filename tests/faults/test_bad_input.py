"""Bad input: async tasks that break a rule of the shared loop, each beside well-behaved siblings.

One worker (8 slots on 2 children) serves every case. Each case sends six
siblings (``effect``) and then one bad task, and expects: a clear stored
outcome for the bad task, a line in the worker log naming it (``name[id]``)
and saying what to fix, its child kept (or, for a task that will not stop,
replaced), and every sibling run exactly once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from tests.integration.conftest import eventually, pg_scalar, run_worker

from . import tasks_bad as bad
from .accounting import Account, publish, settle, stored
from .tasks import INCLUDE, effect

SIBLINGS = 6
CONF = {"asyncsql_processes": 2, "asyncsql_cancel_grace_s": 1,
        "asyncsql_loop_block_warning_s": 0.5}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    with run_worker(tmp_path_factory.mktemp("bad-input"), concurrency=8, conf=CONF,
                    include=f"{INCLUDE},tests.faults.tasks_bad") as worker:
        worker.wait_for_children(2)
        yield worker


@dataclass
class Case:
    account: Account
    label: str  # name[id] of the bad task
    status: str
    result: dict | int
    child: int  # the pid of the child that ran it
    children: list[int]  # the worker's children before it ran


def beside_siblings(worker, case, task, *args, sibling_hold_s=1.0, **options) -> Case:
    """Send the siblings, then the bad task; account for all of them."""
    run = uuid.uuid4().hex
    children = worker.wait_for_children(2)
    siblings = publish(worker, effect, SIBLINGS, run, sibling_hold_s)
    task_id = worker.send(task, run, *args, **options).id
    account = settle(f"bad input: {case}", [task_id, *siblings], run=run, timeout_s=30)
    meta = stored([task_id])[task_id]
    child = pg_scalar("SELECT pid FROM fault_ledger WHERE run = %s AND task_id = %s LIMIT 1",
                      run, task_id)
    return Case(account, f"{task.name}[{task_id}]", meta["status"], meta["result"], child,
                children)


def assert_logged(worker, label, *phrases, timeout_s=10):
    """A line of the worker log names the task and says each of ``phrases``."""
    def found():
        return [line for line in worker.logs().splitlines()
                if label in line and all(phrase in line for phrase in phrases)]
    eventually(found, timeout_s, f"a log line naming {label} and saying {phrases}")


def assert_siblings_ran_once(case, bad_succeeded):
    assert case.account.missing == []
    assert case.account.again == 0
    assert case.account.once == SIBLINGS + bad_succeeded
    assert case.account.failed_total == (not bad_succeeded)


def assert_failed_with(case, exc_type, message_part=""):
    assert case.status == "FAILURE"
    assert case.result["exc_type"] == exc_type
    assert message_part in str(case.result["exc_message"])


def test_a_task_blocking_the_loop_is_named_and_delays_but_spares_its_siblings(worker):
    case = beside_siblings(worker, "time.sleep on the loop", bad.blocks_loop, 1.5)
    assert (case.status, case.result) == ("SUCCESS", case.child)
    assert_logged(worker, f"task {case.label}", "blocks it", "Await instead of blocking")
    assert case.child in worker.children()
    assert_siblings_ran_once(case, bad_succeeded=True)


def test_a_child_whose_loop_is_blocked_is_sent_no_new_task_until_it_runs_again(worker):
    """The blocker's child has more free slots than its sibling, yet the tasks sent once its
    watchdog has spoken all go to the other child, and none waits out the block."""
    run = uuid.uuid4().hex
    worker.wait_for_children(2)
    blocker = worker.send(bad.blocks_loop, run, 4)
    eventually(lambda: pg_scalar("SELECT count(*) FROM fault_ledger WHERE task_id = %s",
                                 blocker.id), 10, "the blocker started")
    assert_logged(worker, f"{bad.blocks_loop.name}[{blocker.id}]", "blocks it")
    eventually(lambda: "its event loop is blocked; no new task goes to it" in worker.logs(), 5,
               "the parent told")
    after = [worker.send(effect, run, 0.0) for _ in range(SIBLINGS)]
    pids = {result.get(timeout=3) for result in after}  # well within the 4 s block
    assert blocker.get(timeout=30) not in pids, "none went to the blocked child"
    account = settle("a sibling sent after a loop blocker", [r.id for r in after], run=run)
    assert account.once == SIBLINGS


def test_a_task_swallowing_cancellation_is_failed_and_its_child_replaced_after_its_siblings(
        worker):
    # Its siblings outlast the hard limit and the grace: they still finish.
    case = beside_siblings(worker, "swallows CancelledError", bad.swallows_cancel, 30,
                           sibling_hold_s=4, soft_time_limit=1, time_limit=2)
    assert_failed_with(case, "TimeLimitExceeded")
    assert_logged(worker, case.label, "swallowed asyncio.CancelledError", "Re-raise it")
    replaced = eventually(lambda: (now := worker.children()) and len(now) == 2
                          and case.child not in now and now, 20, "the stuck child replaced")
    assert set(case.children) - {case.child} <= set(replaced)
    assert_siblings_ran_once(case, bad_succeeded=False)


def test_an_unserializable_result_fails_the_task_and_keeps_the_child(worker):
    case = beside_siblings(worker, "unserializable result", bad.returns_unserializable)
    assert_failed_with(case, "EncodeError", "is not JSON serializable")
    assert_logged(worker, case.label, "raised unexpected: EncodeError",
                  "is not JSON serializable")
    assert case.child in worker.children()
    assert_siblings_ran_once(case, bad_succeeded=False)


def test_an_exception_that_cannot_be_pickled_is_stored_wrapped_and_keeps_the_child(worker):
    case = beside_siblings(worker, "unpicklable exception", bad.raises_unpicklable)
    assert_failed_with(case, "UnpickleableExceptionWrapper", "row 7 of accounts is bad")
    assert "Unpicklable" in case.result["exc_message"]
    assert_logged(worker, case.label, "cannot be pickled", "Make it picklable")
    assert case.child in worker.children()
    assert_siblings_ran_once(case, bad_succeeded=False)


def test_a_session_left_open_is_closed_with_a_warning_and_the_task_succeeds(worker):
    case = beside_siblings(worker, "session left open", bad.leaves_session_open)
    assert (case.status, case.result) == ("SUCCESS", case.child)
    assert_logged(worker, case.label, "session(s) still in a transaction",
                  "async with session() as s:")
    # Returned to the pool by the worker, not terminated by the garbage collector.
    assert "garbage collector is trying to clean up" not in worker.logs()
    assert case.child in worker.children()
    assert_siblings_ran_once(case, bad_succeeded=True)


def test_asyncio_tasks_left_pending_are_cancelled_with_a_warning(worker):
    # Not cancelled, the forgotten Task would write the effect again: "ran again".
    case = beside_siblings(worker, "create_task never awaited", bad.leaves_task_running, 0.5)
    assert (case.status, case.result) == ("SUCCESS", case.child)
    assert_logged(worker, case.label, "still pending (forgotten)", "cancelling them",
                  "Await them")
    assert case.child in worker.children()
    assert_siblings_ran_once(case, bad_succeeded=True)
