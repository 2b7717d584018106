"""A Redis result backend that drops its connections and stops answering mid-run.

The worker's backend is a Redis of the test's own, reached through a proxy the
test controls: twice every connection is cut on the server (``CLIENT KILL``),
then the proxy stops forwarding for longer than ``redis_socket_timeout`` (a
server that stops answering) and resumes. With ``result_backend_always_retry``
every store is retried until it lands, on prefork by Celery's code and on
``-P asyncsql`` by the asyncio writer's copy of that policy: no result is lost,
no child dies or hangs, and a soft time limit due during the silence fires.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from celery import states

from benchmarks.proxy import DelayProxy
from tests.integration import tasks
from tests.integration.conftest import eventually, redis_server

from .accounting import effects, publish, settle
from .tasks_crash import INCLUDE, marked_effect, sync_marked_effect

TASKS, HOLD_S, SLOTS = 300, 0.1, 8
CONF = {"asyncsql_processes": 2, "result_backend_always_retry": True,
        "redis_socket_timeout": 2.0, "redis_socket_connect_timeout": 2.0,
        "result_backend_max_sleep_between_retries_ms": 500}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("pool", ["prefork", "asyncsql"])
def test_results_survive_a_backend_that_drops_and_stops_answering(worker_factory, pool):
    run = uuid.uuid4().hex
    with redis_server() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        server = redis.Redis.from_url(url)
        proxy = DelayProxy(("127.0.0.1", port), delay_s=0.0).start()
        try:
            with worker_factory(pool=pool, concurrency=SLOTS, conf=CONF,
                                include=f"{INCLUDE},tests.integration.tasks",
                                env={"ITEST_BACKEND": f"redis://127.0.0.1:{proxy.port}/0"}
                                ) as worker:
                children = worker.children()
                task = marked_effect if pool == "asyncsql" else sync_marked_effect
                ids = publish(worker, task, TASKS, run, HOLD_S)
                eventually(lambda: effects(run).total() >= TASKS // 6, 60, "a sixth done")
                for _ in range(2):
                    assert server.client_kill_filter(_type="normal") >= 1
                    time.sleep(0.5)
                limited = worker.send(tasks.async_soft_limited if pool == "asyncsql"
                                      else tasks.sync_soft_limited, 30, soft_time_limit=1)
                proxy.pause()  # silent past redis_socket_timeout; the soft limit falls in it
                time.sleep(3.0)
                proxy.resume()
                account = settle(f"result backend cut twice, then silent 3 s ({pool})", ids,
                                 run=run, redis_url=url, timeout_s=120)
                meta = redis_backend_meta(url, limited.id)
                assert worker.children() == children, "no child died or was replaced"
        finally:
            proxy.stop()
    assert account.missing == [] and account.failed_total == 0, account
    assert account.once + account.again == TASKS
    assert meta["status"] == states.FAILURE, meta
    assert meta["result"]["exc_type"] == "SoftTimeLimitExceeded", meta


def redis_backend_meta(url: str, task_id: str) -> dict:
    from kombu.utils.json import loads

    key = f"celery-task-meta-{task_id}"
    eventually(lambda: redis.Redis.from_url(url).exists(key), 60, "the soft limit's FAILURE")
    return loads(redis.Redis.from_url(url).get(key))
