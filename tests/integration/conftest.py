"""Real services and real workers: the integration tests' harness.

Each test starts ``celery worker`` as a subprocess on a queue of its own and
stops it by its PID. A service that cannot be reached fails the test with a
message naming it; nothing is skipped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from celery_asyncpool.pytest_plugin import (
    AsyncsqlWorker,
    asyncsql_worker_process,
    start_worker,
    worker_command,
)
from tests.netns import Host

ROOT = Path(__file__).resolve().parents[2]
# A worker on a test host of its own reaches PostgreSQL elsewhere (tests/netns.py).
PG_DSN = os.environ.get("ITEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ["ITEST_BROKER"]  # this shard's broker database (tests/conftest.py)
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
BROKERS = [pytest.param(REDIS_URL, id="redis"), pytest.param(RABBITMQ_URL, id="amqp")]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def services() -> None:
    """Fail, naming the service, when PostgreSQL, Redis or RabbitMQ cannot be reached."""
    try:
        psycopg.connect(PG_DSN, connect_timeout=5).close()
    except Exception as exc:
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 (database 'test') is unreachable: {exc}",
                    pytrace=False)
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5).ping()
    except Exception as exc:
        pytest.fail(f"Redis at 127.0.0.1:6379 is unreachable: {exc}", pytrace=False)
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=5).close()
    except OSError as exc:
        pytest.fail(f"RabbitMQ at 127.0.0.1:5672 is unreachable: {exc}", pytrace=False)


def eventually(check, timeout_s: float = 30.0, what: str = "condition",
               interval_s: float = 0.1):
    """Poll ``check()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s}s (last: {value!r})")
        time.sleep(interval_s)


def pg_scalar(sql: str, *params: object) -> object:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cursor = conn.execute(sql, params)
        row = cursor.fetchone() if cursor.description else None
        return row[0] if row else None


def pg_connections(app_name: str) -> int:
    """Connections PostgreSQL holds for one worker, by its application_name."""
    return int(pg_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", app_name))


class Worker(AsyncsqlWorker):
    """A ``celery worker`` subprocess on a queue of its own, started by the shipped plugin."""

    def __init__(self, proc: subprocess.Popen[bytes], hostname: str, log_path: Path, *,
                 queue: str, app_name: str, broker: str = REDIS_URL) -> None:
        super().__init__(proc, hostname, log_path)
        self.queue = queue
        self.app_name = app_name
        self.broker = broker
        self._connection = None
        self._client = None

    def connection(self):
        """A connection to this worker's broker, to publish on."""
        from .app import app

        if self._connection is None:
            self._connection = app.connection_for_write(self.broker)
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.release()
            self._connection = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def send(self, task, *args, **options):
        """Publish ``task`` to this worker's queue, on this worker's broker."""
        if self.broker != REDIS_URL:
            options.setdefault("connection", self.connection())
        return task.apply_async(args=args, queue=self.queue, **options)

    def inspect(self, timeout: float = 2):
        """``inspect`` for this worker alone, on its broker."""
        return self.control().inspect(destination=[self.hostname], timeout=timeout)

    def control(self):
        """``app.control`` on this worker's broker (its mailbox publishes on the app's own)."""
        from celery import Celery

        from .app import app

        if self.broker == REDIS_URL:
            return app.control
        if self._client is None:
            self._client = Celery("itest-client", broker=self.broker,
                                  backend=app.conf.result_backend)
        return self._client.control

    def queued(self) -> int:
        """Messages ready (not delivered) in this worker's queue on its broker."""
        channel = self.connection().default_channel
        if self.broker.startswith("redis"):
            return int(channel.client.llen(self.queue))
        return channel.queue_declare(self.queue, passive=True).message_count

    def children(self) -> list[int]:
        """The pool's children: billiard's semaphore tracker (spawn starts one) is not one."""
        try:
            found = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        return sorted(p.pid for p in found if not _is_semaphore_tracker(p))

    def wait_for_log(self, needle: str, timeout_s: float = 30) -> None:
        try:
            super().wait_for_log(needle, timeout_s)
        except RuntimeError as exc:
            raise AssertionError(str(exc)[-5000:]) from None

    def wait_for_children(self, count: int, timeout_s: float = 20) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while len(children := self.children()) != count:
            assert time.monotonic() < deadline, f"children {children} != {count}"
            time.sleep(0.1)
        return children  # the snapshot that matched: a recycling child may go right after

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Send ``sig`` (warm shutdown by default) and wait for the worker to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not exit within {timeout_s}s:\n{self.logs()[-5000:]}")

    def kill(self) -> None:
        """SIGKILL the worker and every child it still has."""
        super().kill()
        self.proc.wait(10)


def _is_semaphore_tracker(process: psutil.Process) -> bool:
    try:
        return "billiard.semaphore_tracker" in " ".join(process.cmdline())
    except psutil.Error:
        return False


@contextmanager
def run_worker(tmp_path: Path, *, pool: str = "asyncsql", concurrency: int = 2,
               conf: dict | None = None, args: tuple[str, ...] = (),
               include: str = "tests.integration.tasks", env: dict | None = None,
               ready: bool = True, queue: str | None = None,
               broker: str = REDIS_URL, host: Host | None = None,
               name: str | None = None) -> Iterator[Worker]:
    """Start a worker (on a new queue unless given one), wait until it is ready, stop it.

    Through the shipped pytest plugin's launcher, as users' own tests start theirs;
    on a test ``host`` (tests/netns.py), its command run there. ``name`` is its node
    name's first part (the queue's name by default), for workers that share a queue.
    """
    queue = queue or f"itest-{uuid.uuid4().hex[:10]}"
    environment = {
        "ITEST_QUEUE": queue,
        "ITEST_APP_NAME": queue,
        "ITEST_INCLUDE": include,
        "ITEST_CONF": json.dumps(conf or {}),
        "ITEST_BROKER": broker,
        **(env or {}),
    }
    hostname = f"{name or queue}@{socket.gethostname()}"
    options = dict(env=environment, cwd=ROOT, pythonpath=[str(ROOT)], hostname=hostname,
                   log_path=tmp_path / f"{name or queue}.log", worker_class=Worker, queue=queue,
                   app_name=queue, broker=broker)
    worker_args = ["-Q", queue, "--without-heartbeat", *args]
    if host is None:
        launch = asyncsql_worker_process(
            "tests.integration.app", pool=pool or None, concurrency=concurrency or None,
            args=worker_args, ready=False, **options)
    else:
        command = worker_command("tests.integration.app", hostname=hostname, pool=pool or None,
                                 concurrency=concurrency or None, args=worker_args)
        launch = nullcontext(start_worker(host.command(*command), **options))
    with launch as worker:
        try:
            if ready:
                worker.wait_for_log(" ready.")
            yield worker
        finally:
            if worker.proc.poll() is None:
                try:
                    worker.stop(timeout_s=30)
                except AssertionError:
                    pass
            worker.close()


@pytest.fixture
def worker_factory(tmp_path: Path):
    """``with worker_factory(pool=..., concurrency=..., conf=...) as w:``."""
    def factory(**kwargs):
        return run_worker(tmp_path, **kwargs)
    return factory


@contextmanager
def redis_server(bind: tuple[str, ...] = ()) -> Iterator[str]:
    """A ``redis-server`` of the test's own on a free port, stopped by its PID: its URL.

    For figures the machine's shared Redis would blur (``INFO commandstats``). It
    listens on 127.0.0.1 and on the addresses in ``bind`` (a test host's link).
    """
    from tests.celery_suite.run import redis_server as own_server

    with own_server(fail=lambda message: pytest.fail(message, pytrace=False),
                    bind=bind) as port:
        yield f"redis://127.0.0.1:{port}/0"


@contextmanager
def redis_tls_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A TLS-only ``redis-server`` with a self-signed certificate: its URL and CA file."""
    from tests.celery_suite.run import free_port

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True)
    if made.returncode:
        pytest.fail(f"openssl could not make a certificate: {made.stderr.decode()}")
    port = free_port()
    with _server(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                  "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                  "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                  "--save", "", "--appendonly", "no"], port, "redis-server with TLS"):
        yield f"rediss://127.0.0.1:{port}/0", str(cert)


@contextmanager
def redis_sentinel(master_url: str) -> Iterator[str]:
    """A Redis Sentinel watching the Redis at ``master_url`` as ``itest``: its URL."""
    import tempfile

    from tests.celery_suite.run import free_port

    master = redis.Redis.from_url(master_url).connection_pool.connection_kwargs
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        config = Path(workdir) / "sentinel.conf"  # Sentinel rewrites its config file
        config.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                          f"sentinel monitor itest {master['host']} {master['port']} 1\n")
        with _server(["redis-server", str(config), "--sentinel"], port, "redis-sentinel"):
            eventually(lambda: redis.Redis(port=port).sentinel_master("itest"), 10,
                       "Sentinel knows the master")
            yield f"sentinel://127.0.0.1:{port}/0"


@contextmanager
def _server(command: list[str], port: int, what: str) -> Iterator[None]:
    """Run ``command`` until the block ends (stopped by its PID); wait for ``port``."""
    from tests.celery_suite.run import server

    with server(command, port, what, fail=lambda message: pytest.fail(message, pytrace=False)):
        yield
