"""The result store's asyncio client carries the backend's connection settings, as Celery's does."""

import ssl

import redis.asyncio
import redis.asyncio.sentinel
from celery import Celery

from celery_asyncpool import results


def _backend(url: str, **conf):
    app = Celery("results-unit", backend=url, set_as_current=False)
    app.conf.update(conf)
    return app.backend


def test_a_redis_url_keeps_timeouts_and_the_connection_limit():
    backend = _backend("redis://:secret@cache.internal:6380/3", redis_socket_timeout=7.0,
                       redis_socket_connect_timeout=3.0, redis_max_connections=11)
    pool = results.async_client(backend).connection_pool
    assert pool.connection_class is redis.asyncio.Connection
    assert pool.max_connections == 11
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == (
        "cache.internal", 6380, 3, "secret")
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (7.0, 3.0)


def test_rediss_takes_the_ssl_settings_with_cert_reqs_as_asyncio_names_them():
    backend = _backend("rediss://cache.internal:6380/0?ssl_cert_reqs=required")
    pool = results.async_client(backend).connection_pool
    assert pool.connection_class is redis.asyncio.SSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    backend = _backend("redis://cache.internal:6380/0",
                       redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_NONE})
    pool = results.async_client(backend).connection_pool
    assert pool.connection_class is redis.asyncio.SSLConnection
    assert pool.connection_kwargs["ssl_cert_reqs"] == "none"


def test_a_unix_socket_url_is_a_unix_socket_connection():
    pool = results.async_client(_backend("redis+socket:///run/redis.sock")).connection_pool
    assert pool.connection_class is redis.asyncio.UnixDomainSocketConnection
    assert pool.connection_kwargs["path"] == "/run/redis.sock"


def test_sentinel_reaches_the_master_its_transport_options_name():
    backend = _backend("sentinel://:pw@s1:26379;sentinel://:pw@s2:26379/2",
                       result_backend_transport_options={"master_name": "results"})
    client = results.async_client(backend)
    pool = client.connection_pool
    assert isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool)
    assert pool.service_name == "results"
    hosts = [(c.connection_pool.connection_kwargs["host"],
              c.connection_pool.connection_kwargs["port"]) for c in pool.sentinel_manager.sentinels]
    assert hosts == [("s1", 26379), ("s2", 26379)]
    assert pool.connection_kwargs["db"] == backend.connparams["db"]  # as Celery's client


def test_only_redis_backends_get_the_store(tmp_path):
    assert results.install(_backend(f"db+sqlite:///{tmp_path / 'results.db'}")) is None
    redis_backend = _backend("redis://localhost/0")
    store = results.install(redis_backend)
    assert isinstance(store, results.ResultStore)
    assert results.install(redis_backend) is store  # once: the parent's, inherited by children
