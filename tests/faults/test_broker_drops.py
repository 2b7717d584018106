"""The worker's broker connections cut three times mid-run: it reconnects and loses nothing.

Redis broker DB 13 with a short visibility timeout (as tests/integration/test_broker.py,
whose ``drop_broker_connections`` closes the worker's connections on the
server). Half the tasks are acknowledged at their start, half ``acks_late``.
Running tasks finish (no cancel: ``worker_cancel_long_running_tasks_on_connection_loss``
is off), so every start has its effect. Messages the worker held unacknowledged
are delivered again by the broker: at-least-once, by design, counted as ran again.
"""

from __future__ import annotations

import uuid

from tests.integration.conftest import eventually
from tests.integration.test_broker import REDIS_BROKER, TRANSPORT, _prefetch, \
    drop_broker_connections

from .accounting import effects, publish, settle
from .tasks_crash import INCLUDE, marked_effect, marked_effect_late, starts

DROPS = 3
CHUNK = 100  # of each task, sent before each drop: more than eight slots finish in between
HOLD_S = 0.1
SLOTS, MULTIPLIER = 8, 4
CONF = {"asyncsql_processes": 2, "worker_prefetch_multiplier": MULTIPLIER,
        "broker_transport_options": TRANSPORT}


def count_in_log(worker, needle: str) -> int:
    return worker.logs().count(needle)


def drop_and_reconnect(worker, nth: int) -> None:
    """Cut the worker's broker connections (the ``nth`` time) and wait for it to connect again."""
    assert drop_broker_connections(worker) >= 1, "the worker had broker connections to cut"
    eventually(lambda: count_in_log(worker, "Connection to broker lost") >= nth, 30,
               f"broker connection loss {nth} seen")
    eventually(lambda: count_in_log(worker, "Connected to redis://") >= nth + 1, 60,
               f"reconnect {nth}")


def test_after_broker_connections_drop_the_worker_reconnects_and_every_task_finishes(
        worker_factory):
    run = uuid.uuid4().hex
    ids: list[str] = []
    with worker_factory(concurrency=SLOTS, include=INCLUDE, conf=CONF,
                        broker=REDIS_BROKER) as worker:
        for nth in range(1, DROPS + 1):
            ids += publish(worker, marked_effect, CHUNK, run, HOLD_S)
            ids += publish(worker, marked_effect_late, CHUNK, run, HOLD_S)
            eventually(lambda: effects(starts(run)).total() >= len(ids) - CHUNK, 60,
                       "the pool busy with the last chunk")
            drop_and_reconnect(worker, nth)
        account = settle(f"broker connections dropped x{DROPS}", ids, run=run, timeout_s=60)
        eventually(lambda: _prefetch(worker) == SLOTS * MULTIPLIER, 20,
                   "prefetch back to slots x multiplier")
        ran, started = effects(run), effects(starts(run))
    assert account.missing == []
    assert account.failed_total == 0, account.reasons
    assert ran == started, "every run that started finished: none was cancelled or lost"
