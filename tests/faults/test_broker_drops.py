"""The worker's broker connections cut mid-run, 3 times (--soak: 15): it reconnects, loses nothing.

Redis broker DB 13 with a short visibility timeout (as tests/integration/test_broker.py,
whose ``drop_broker_connections`` closes the worker's connections on the
server). Half the tasks are acknowledged at their start, half ``acks_late``.
Running tasks finish (no cancel: ``worker_cancel_long_running_tasks_on_connection_loss``
is off), so every start has its effect. Messages the worker held unacknowledged
are delivered again by the broker: at-least-once, by design, counted as ran again.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.integration.conftest import RABBITMQ_URL, eventually
from tests.integration.test_broker import (
    REDIS_BROKER,
    TRANSPORT,
    _prefetch,
    drop_broker_connections,
)

from .accounting import effects, publish, settle
from .tasks_crash import INCLUDE, marked_effect, marked_effect_late, starts

pytestmark = pytest.mark.serial  # it cuts the broker's connections

OURS = "celery_asyncpool.broker:Transport"
DROPS = [pytest.param(3, id="3-drops"),
         pytest.param(15, id="15-drops", marks=[pytest.mark.soak, pytest.mark.timeout(600)])]
CHUNK = 200  # of each task, sent before each drop: more than eight slots finish in between
HOLD_S = 0.05
SLOTS, MULTIPLIER = 8, 4
CONF = {"asyncsql_processes": 2, "worker_prefetch_multiplier": MULTIPLIER,
        "broker_transport_options": TRANSPORT}


def count_in_log(worker, needle: str) -> int:
    return worker.logs().count(needle)


def running(run: str) -> int:
    """Tasks of ``run`` started and not finished (each start and effect is a ledger row)."""
    return effects(starts(run)).total() - effects(run).total()


def drop_and_reconnect(worker, nth: int) -> None:
    """Cut the worker's broker connections (the ``nth`` time) and wait for it to connect again."""
    assert drop_broker_connections(worker) >= 1, "the worker had broker connections to cut"
    eventually(lambda: count_in_log(worker, "Connection to broker lost") >= nth, 30,
               f"broker connection loss {nth} seen")
    # "Connected to redis://..." or, on the broker transport, "...broker:Transport://..."
    eventually(lambda: count_in_log(worker, "Connected to ") >= nth + 1, 60,
               f"reconnect {nth}")


@pytest.mark.parametrize("transport", [pytest.param(None, id="kombu"),
                                       pytest.param(OURS, id="broker-transport")])
@pytest.mark.parametrize("drops", DROPS)
def test_after_broker_connections_drop_the_worker_reconnects_and_every_task_finishes(
        worker_factory, drops, transport):
    run = uuid.uuid4().hex
    ids: list[str] = []
    conf = {**CONF, "broker_transport": transport} if transport else CONF
    with worker_factory(concurrency=SLOTS, include=INCLUDE, conf=conf,
                        broker=REDIS_BROKER) as worker:
        for nth in range(1, drops + 1):
            ids += publish(worker, marked_effect, CHUNK, run, HOLD_S)
            ids += publish(worker, marked_effect_late, CHUNK, run, HOLD_S)
            eventually(lambda: effects(starts(run)).total() >= len(ids) - CHUNK, 60,
                       "the pool busy with the last chunk")
            eventually(lambda: running(run) > 0, 10, "tasks running at the drop")
            drop_and_reconnect(worker, nth)
        account = settle(f"broker connections dropped x{drops}"
                         f"{' (broker transport)' if transport else ''}", ids, run=run,
                         timeout_s=30 + drops * 10)
        eventually(lambda: _prefetch(worker) == SLOTS * MULTIPLIER, 20,
                   "prefetch back to slots x multiplier")
        # A copy redelivered after a drop may start after the first copy's result is stored.
        eventually(lambda: effects(run) == effects(starts(run)), 10, "the runs started ended")
        ran, started = effects(run), effects(starts(run))
    assert account.missing == []
    assert account.failed_total == 0, account.reasons
    assert ran == started, "every run that started finished: none was cancelled or lost"


@pytest.mark.timeout(300)
def test_rabbitmq_restarted_mid_run_loses_nothing(worker_factory):
    """The machine's RabbitMQ stopped and started again (``rabbitmqctl stop_app``, its
    durable queues and persistent messages kept) under load: the worker reconnects by
    itself and every task ends; what it held unacknowledged is delivered again."""
    run = uuid.uuid4().hex
    with worker_factory(concurrency=SLOTS, include=INCLUDE, conf=CONF,
                        broker=RABBITMQ_URL) as worker:
        ids = publish(worker, marked_effect_late, 1500, run, 0.02)
        eventually(lambda: effects(run).total() >= 300, 60, "a fifth of the batch done")
        try:
            rabbitmqctl("stop_app")
            worker.wait_for_log("Connection to broker lost")
        finally:
            rabbitmqctl("start_app")
        account = settle("broker RabbitMQ restarted mid-run", ids, run=run, timeout_s=180)
    assert account.missing == [] and account.failed_total == 0, account.reasons


def rabbitmqctl(command: str) -> None:
    done = subprocess.run(["rabbitmqctl", "-q", command], capture_output=True, text=True,
                          timeout=120)
    if done.returncode:
        pytest.fail(f"rabbitmqctl {command} failed: {done.stderr.strip()}", pytrace=False)
