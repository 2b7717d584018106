"""The package's Redis broker transport under faults, each next to kombu's own transport.

Each test has a Redis server of its own as the broker (a short
``visibility_timeout`` restores unacked messages of a whole database). The
tasks are ``acks_late``, so every message a dead worker held comes back.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.celery_suite.run import free_port
from tests.integration.conftest import eventually, redis_server

from .accounting import effects, publish, settle
from .tasks import effect
from .tasks_crash import INCLUDE, marked_effect_late, starts, sync_marked_effect_late

pytestmark = pytest.mark.serial  # kills workers and a Redis server under load

OURS = "celery_asyncpool.broker:Transport"
# The controls on kombu's transport and prefork run in CI's load part, to keep scripts/test
# within its ten minutes.
CONTROL = pytest.mark.load
VISIBILITY = {"visibility_timeout": 4, "unacked_restore_interval": 1,
              "unacked_restore_throttle": 1}


def conf(transport: str | None, **more) -> dict:
    settings = {"asyncsql_processes": 2, "broker_transport_options": VISIBILITY, **more}
    if transport:
        settings["broker_transport"] = transport
    return settings


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", [pytest.param(None, id="kombu", marks=CONTROL),
                                       pytest.param(OURS, id="ours")])
def test_a_worker_killed_mid_batch_loses_nothing(worker_factory, transport):
    """SIGKILL while batches are fetched, delivered and acked: another worker runs what the
    dead one held after visibility_timeout; every task at least once, none missing. kombu's
    transport may lose one: the message its BRPOP had taken and not yet recorded, when the
    kill falls in that round trip (seen in CI on 2026-12-07)."""
    run = uuid.uuid4().hex
    with redis_server() as url:
        with worker_factory(concurrency=50, include=INCLUDE, conf=conf(transport),
                            broker=url) as doomed:
            ids = publish(doomed, marked_effect_late, 1500, run, 0.02)
            eventually(lambda: effects(run).total() >= 300, 60, "a fifth of the batch done")
            doomed.kill()
            queue = doomed.queue
        with worker_factory(concurrency=50, include=INCLUDE, conf=conf(transport),
                            broker=url, queue=queue):
            account = settle(f"worker SIGKILLed mid-batch ({'ours' if transport else 'kombu'})",
                             ids, run=run, timeout_s=120 if transport else 30)
    assert account.failed_total == 0, account.reasons
    if transport is None:
        assert len(account.missing) <= 1, account.missing
    else:
        assert account.missing == []
        assert effects(starts(run)).total() >= len(ids)


@contextlib.contextmanager
def durable_redis(path: Path) -> Iterator[tuple[str, callable]]:
    """A Redis that writes every command to its append-only file, and a restart of it."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(path),
               "--appendonly", "yes", "--appendfsync", "always", "--save", ""]
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH: a Redis server of its own is started here")
    servers = [subprocess.Popen(command, stdout=subprocess.DEVNULL)]
    url = f"redis://127.0.0.1:{port}/0"

    def up() -> bool:
        with contextlib.suppress(redis.ConnectionError):
            return bool(redis.Redis.from_url(url).ping())
        return False

    def restart(down_s: float = 1.0) -> None:
        redis.Redis.from_url(url).shutdown(save=False, nosave=False)  # the AOF is on disk
        servers[-1].wait(10)
        time.sleep(down_s)
        servers.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        eventually(up, 20, "Redis back")

    try:
        eventually(up, 20, "Redis up")
        yield url, restart
    finally:
        servers[-1].terminate()
        servers[-1].wait(10)


POOLS = [pytest.param("asyncsql", 50, marked_effect_late, id="asyncsql"),
         pytest.param("prefork", 8, sync_marked_effect_late, id="prefork", marks=CONTROL)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pool,slots,task", POOLS)
def test_redis_restarted_mid_run_loses_nothing(worker_factory, tmp_path, pool, slots, task):
    """Redis shut down and started again (its append-only file kept) under load: the
    worker reconnects and every task ends. kombu's own transport is left out: in 6 of 7
    runs of this test on kombu 5.7.0 its worker either stopped ("Unrecoverable error:
    AttributeError", restoring delivered messages through a connection Celery had
    collected) or reconnected and took no more messages (docs/broker.md)."""
    transport = OURS
    run = uuid.uuid4().hex
    with durable_redis(tmp_path) as (url, restart), worker_factory(
            pool=pool, concurrency=slots, include=INCLUDE, conf=conf(transport),
            broker=url) as worker:
        ids = publish(worker, task, 1500, run, 0.02)
        eventually(lambda: effects(run).total() >= 300, 60, "a fifth of the batch done")
        restart()
        worker.wait_for_log("Connection to broker lost")
        account = settle(f"broker Redis restarted mid-run (ours, {pool})", ids,
                         run=run, timeout_s=180)
    assert account.missing == [] and account.failed_total == 0, account.reasons


@pytest.mark.load
@pytest.mark.timeout(420)
def test_a_burst_of_20000_at_c100_leaves_no_unacked_entry(worker_factory):
    """No fault: every task runs once. The broker's default visibility_timeout (an hour):
    at the faults' 4 s, a message prefetched behind 400 others on a machine the Celery
    suite shares restored and ran twice (87 of 20,000 in CI on 2026-12-07)."""
    run = uuid.uuid4().hex
    with redis_server() as url, worker_factory(concurrency=100, include=INCLUDE,
                                               conf=conf(OURS, broker_transport_options={}),
                                               broker=url) as worker:
        ids = publish(worker, effect, 20_000, run)
        account = settle("burst of 20,000 at -c 100 on the broker transport", ids, run=run,
                         timeout_s=300)
        client = redis.Redis.from_url(url)
        eventually(lambda: client.zcard("unacked_index") == 0 == client.hlen("unacked"), 10,
                   "the unacked index and hash empty")
    assert account.missing == [] and account.failed_total == 0, account.reasons
    assert account.once == len(ids)
