"""``asyncsql_loop = "uvloop"``: each child runs its tasks on a uvloop loop."""

from pathlib import Path

import pytest

from . import tasks_loop, tasks_uvloop

INCLUDE = "tests.integration.tasks,tests.integration.tasks_uvloop"


@pytest.mark.parametrize("setting,loop_class", [
    ("uvloop", "uvloop.Loop"),
    ("asyncio", "asyncio.unix_events._UnixSelectorEventLoop"),
])
def test_tasks_run_on_the_loop_the_setting_names(worker_factory, setting, loop_class):
    """8 tasks on -c 4 over 2 children: every one ran on the named loop, used the child's
    pooled engine, and both children served them."""
    conf = {"asyncsql_processes": 2, "asyncsql_loop": setting}
    with worker_factory(concurrency=4, include=INCLUDE, conf=conf) as worker:
        children = worker.wait_for_children(2)
        results = [worker.send(tasks_uvloop.loop_kind, 0.3) for _ in range(8)]
        seen = [result.get(timeout=60) for result in results]
    assert {s["loop"] for s in seen} == {loop_class}
    assert {s["child"] for s in seen} == set(children)
    for child in children:  # the pool (2 connections per child) reused across its tasks
        assert len({s["backend_pid"] for s in seen if s["child"] == child}) <= 2


def test_a_worker_asked_for_uvloop_states_it_at_start_up(worker_factory):
    with worker_factory(concurrency=2, include=INCLUDE,
                        conf={"asyncsql_loop": "uvloop", "asyncsql_processes": 2}) as worker:
        worker.wait_for_log("1 task slot(s) each, on uvloop event loops")


@pytest.mark.parametrize("setting", ["uvloop", "asyncio"])
def test_the_watchdog_shows_only_the_blocking_tasks_stack_on_either_loop(worker_factory,
                                                                         setting):
    """uvloop runs callbacks from C: the warning's stack still starts at the task's body,
    not at the process's entry point."""
    conf = {"asyncsql_processes": 1, "asyncsql_loop": setting}
    with worker_factory(concurrency=2, include=f"{INCLUDE},tests.integration.tasks_loop",
                        conf=conf) as worker:
        blocker = worker.send(tasks_loop.block, 1.6)
        blocker.get(timeout=30)
        worker.wait_for_log("runs again after being blocked")
    stack = worker.logs().split("The loop thread's stack:\n", 1)[1].split("\n[", 1)[0]
    source = Path(tasks_loop.__file__).read_text().splitlines()
    line = next(n for n, text in enumerate(source, 1) if "# blocks the loop" in text)
    assert stack.splitlines() == [
        f'  File "{tasks_loop.__file__}", line {line}, in block',
        "    time.sleep(seconds)  # blocks the loop",
    ]
