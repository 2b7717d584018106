"""A child SIGKILLed every second under load: every task ran, ran again, or failed with its reason.

Eight slots in two children (four each), so each kill takes several tasks in
flight at once. With ``acks_late`` + ``task_reject_on_worker_lost`` Celery
rejects a lost task's message with requeue, so the broker delivers it again:
every task ends SUCCESS. Acknowledged at their start, lost tasks are stored as
``WorkerLostError`` and never run again; nothing vanishes either way. Stock
prefork (eight children) runs the same load with the sync twin, as the reference.

Before each kill the test sends another ``CHUNK`` of tasks, more than eight
slots can finish between two kills, so every kill lands on a busy pool however
fast the machine is. CI runs 4 kills (500 tasks); ``--soak`` runs 40 (4100).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import pytest

from tests.integration.conftest import eventually

from .accounting import effects, figure, publish, settle
from .tasks_crash import INCLUDE, marked_effect, starts, sync_marked_effect

HOLD_S = 0.1  # eight slots finish at most 80 tasks a second
CHUNK = 100  # sent before each kill, a second apart
KILL_EVERY_S = 1.0
FRESH = 50  # the batch a healthy worker runs after the kills
REDELIVER = {"task_acks_late": True, "task_reject_on_worker_lost": True}
POOLS = [pytest.param("asyncsql", marked_effect, 2, id="asyncsql"),
         pytest.param("prefork", sync_marked_effect, 8, id="prefork")]
KILLS = [pytest.param(4, id="4-kills"),
         pytest.param(40, id="40-kills", marks=[pytest.mark.soak, pytest.mark.timeout(600)])]
CAUGHT = re.compile(r"exited with signal 9 \(SIGKILL\) while running (\d+) job")


def run_with_kills(worker, task, run: str, children: int,
                   kills: int) -> tuple[list[str], list[int]]:
    """Send a chunk of tasks, SIGKILL a child (each in turn) a second later, ``kills`` times,
    then send the last chunk; return the ids sent and the pids killed."""
    ids: list[str] = []
    killed: list[int] = []
    for n in range(kills):
        ids += publish(worker, task, CHUNK, run, HOLD_S)
        time.sleep(KILL_EVERY_S)
        victim = all_children(worker, children, killed)[n % children]
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
    return ids + publish(worker, task, CHUNK, run, HOLD_S), killed


def all_children(worker, children: int, killed: list[int]) -> list[int]:
    """The worker's children once it has all ``children`` again, none of them a killed one
    (prefork reaps a killed child a moment later: until then it is still listed)."""
    return eventually(lambda: (pids := worker.children()) and len(pids) == children
                      and not set(pids) & set(killed) and pids, 30, f"{children} live children")


def assert_healthy(worker, children: int, killed: list[int], task, run: str) -> list[str]:
    """The worker has all its children, none of them a killed one, answers a ping and takes a
    fresh batch; return the batch's ids."""
    all_children(worker, children, killed)
    assert worker.control().ping(destination=[worker.hostname], timeout=5), "no ping answer"
    return publish(worker, task, FRESH, run, 0)


def started_twice(run: str) -> int:
    return sum(1 for n in effects(starts(run)).values() if n >= 2)


def caught_per_kill(worker) -> list[int]:
    """Jobs in flight in each killed asyncsql child, as the pool logged them."""
    return [int(n) for n in CAUGHT.findall(worker.logs())]


@pytest.mark.parametrize("kills", KILLS)
@pytest.mark.parametrize("pool,task,children", POOLS)
def test_with_reject_on_worker_lost_every_killed_task_is_delivered_again_and_succeeds(
        worker_factory, pool, task, children, kills):
    run = uuid.uuid4().hex
    with worker_factory(pool=pool, concurrency=8, conf=REDELIVER, include=INCLUDE) as worker:
        ids, killed = run_with_kills(worker, task, run, children, kills)
        ids += assert_healthy(worker, children, killed, task, run)
        account = settle(f"{pool}: child SIGKILL every {KILL_EVERY_S:g} s x{kills}, acks_late + "
                         f"reject_on_worker_lost", ids, run=run, timeout_s=30 + kills * 5)
        caught = caught_per_kill(worker)
    assert account.missing == []
    assert account.failed_total == 0, account.reasons
    assert account.once + account.again == (kills + 1) * CHUNK + FRESH
    assert started_twice(run) > 0, "the kills caught tasks in flight, delivered again"
    if pool == "asyncsql":
        assert len(caught) == kills and sum(caught) > kills, "several tasks in flight per kill"


@pytest.mark.parametrize("kills", KILLS)
@pytest.mark.parametrize("pool,task,children", POOLS)
def test_acknowledged_at_start_every_killed_task_is_a_stored_worker_lost_error(
        worker_factory, pool, task, children, kills):
    run = uuid.uuid4().hex
    with worker_factory(pool=pool, concurrency=8, include=INCLUDE) as worker:
        ids, killed = run_with_kills(worker, task, run, children, kills)
        ids += assert_healthy(worker, children, killed, task, run)
        account = settle(f"{pool}: child SIGKILL every {KILL_EVERY_S:g} s x{kills}, acks on start",
                         ids, run=run, timeout_s=30 + kills * 5)
        caught = caught_per_kill(worker)
    figure(f"tasks lost per child SIGKILL, {pool} ({8 // children} slot(s) a child), acks on start",
           f"{account.failed_total / kills:.1f}")
    assert account.missing == []
    assert set(account.failed) == {"WorkerLostError"}, account.reasons
    assert account.again == 0 and started_twice(run) == 0, "a lost task is never run again"
    assert account.once + account.failed_total == (kills + 1) * CHUNK + FRESH
    if pool == "asyncsql":
        assert kills < account.failed_total <= sum(caught), "the jobs the kills caught, lost"
