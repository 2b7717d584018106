"""What kombu's Redis transport promises, kept by ``celery_asyncpool.broker``, next to kombu's.

TLS (``rediss://``), Sentinel, warm shutdown, and ``visibility_timeout`` with a
prefetch window the pool takes longer than that to start. Each test runs a
real worker on Redis servers of its own.
"""

from __future__ import annotations

import pytest
import redis

from . import tasks_transport as tt
from .conftest import eventually, redis_sentinel, redis_server, redis_tls_server
from .test_redis_transport import INCLUDE, TRANSPORTS, conf, unacked_tags


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_window_larger_than_visibility_timeout_allows(worker_factory, transport):
    """-c 2 with a 40-message window, tasks of 0.25 s: the last of a full window waits 5 s
    for a slot, past a 2 s visibility_timeout (swept every second). kombu fetches the
    window and its sweep restores what has not started: those tasks run twice. Ours
    measures how fast the pool starts messages and holds no more than it starts within
    half the timeout."""
    options = {"visibility_timeout": 2, "unacked_restore_interval": 1,
               "unacked_restore_throttle": 1}  # the budget is on by default
    settings = {**conf(transport, **options), "worker_prefetch_multiplier": 20}
    with redis_server() as url, worker_factory(pool="asyncsql", concurrency=2, include=INCLUDE,
                                               conf=settings, broker=url) as worker:
        results = [worker.send(tt.async_nap, 0.25, i) for i in range(40)]
        # Broadcasts are read while tasks wait for a slot (revoke, inspect).
        assert worker.inspect(timeout=3).ping() == {worker.hostname: {"ok": "pong"}}
        assert [r.get(timeout=120) for r in results] == list(range(40))
        eventually(lambda: not unacked_tags(url), 30, "every delivery acked")
        assert worker.stop() == 0
        runs = [worker.logs().count(f"[{r.id}] succeeded") for r in results]
    twice = sum(count > 1 for count in runs)
    if transport is None:
        assert twice > 0, "kombu: restored while waiting for a slot, run again"
    else:
        assert twice == 0, runs


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_warm_shutdown_puts_back_what_has_not_started(worker_factory, transport):
    """SIGTERM with a window fetched: the running tasks finish, the rest go back to the
    queue at once (not after visibility_timeout), nothing stays unacked."""
    with redis_server() as url, worker_factory(pool="asyncsql", concurrency=2, include=INCLUDE,
                                               conf=conf(transport), broker=url) as worker:
        client = redis.Redis.from_url(url)
        results = [worker.send(tt.async_nap, 2, i) for i in range(8)]
        eventually(lambda: client.llen(worker.queue) == 0, 20, "the window fetched")
        eventually(lambda: any(r.ready() for r in results), 20, "the first tasks done")
        assert worker.stop() == 0
        done = [r for r in results if r.ready()]
        assert all(r.get() == results.index(r) for r in done)
        assert len(done) + client.llen(worker.queue) == 8, "every task ran or waits"
        assert not unacked_tags(url), "nothing left for visibility_timeout"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_rediss(worker_factory, transport, tmp_path):
    """A TLS-only Redis (``rediss://``, certificate verified): tasks run, ``inspect`` answers."""
    from celery import Celery

    with redis_tls_server(tmp_path) as (url, ca):
        tls = {"ssl_cert_reqs": "required", "ssl_ca_certs": ca}
        settings = {**conf(transport), "broker_use_ssl": tls}
        with worker_factory(pool="asyncsql", concurrency=4, include=INCLUDE, conf=settings,
                            broker=url) as worker:
            client = Celery("tls-client", broker=url, backend=tt.app.conf.result_backend)
            client.conf.broker_use_ssl = tls
            with client.connection_for_write() as connection:
                results = [tt.async_echo.apply_async((i,), queue=worker.queue,
                                                     connection=connection)
                           for i in range(20)]
                assert [r.get(timeout=60) for r in results] == list(range(20))
            ping = client.control.inspect(destination=[worker.hostname], timeout=3).ping()
            assert ping == {worker.hostname: {"ok": "pong"}}


@pytest.mark.parametrize("transport", [pytest.param(None, id="kombu"), pytest.param(
    "celery_asyncpool.broker:SentinelTransport", id="ours")])
def test_sentinel(worker_factory, transport):
    """``sentinel://``: the worker asks Sentinel for the master and consumes from it."""
    with redis_server() as url, redis_sentinel(url) as sentinel_url:
        settings = {**conf(transport, master_name="itest")}
        with worker_factory(pool="asyncsql", concurrency=4, include=INCLUDE, conf=settings,
                            broker=url, env={"ITEST_BROKER": sentinel_url}) as worker:
            results = [worker.send(tt.async_echo, i) for i in range(20)]
            assert [r.get(timeout=60) for r in results] == list(range(20))
            assert worker.inspect(timeout=3).ping() == {worker.hostname: {"ok": "pong"}}
            eventually(lambda: not unacked_tags(url), 10, "every delivery acked")
