"""Start a scenario's worker, publish a batch to it and time the batch from first publish to last result.

The time of the last result is the latest ``date_done`` the worker stored, so
how often the runner polls for results does not change the figure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import psutil
import psycopg
import redis
from celery import Celery
from kombu.utils.json import loads

from .scenarios import Scenario
from .settings import BACKEND_URL, BROKER_URL, DATABASE, USERS

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Batch:
    """One timed batch of one workload on one scenario's worker."""

    scenario: str
    workload: str
    round: int
    tasks: int
    seconds: float
    failures: int
    peak_connections: int
    peak_pss_mb: float
    cpu_ms_per_task: float
    # Commands the Redis server ran during the batch, where the run counts them.
    commands: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.tasks / self.seconds


@contextmanager
def running_worker(scenario: Scenario, round_: int, logs: Path) -> Iterator[Worker]:
    """The scenario's worker on a queue of its own; warm shutdown (then a kill) on exit."""
    queue = f"bench.{scenario.name}.{round_}"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{scenario.name}-round{round_}.log"
    command = [sys.executable, "-m", "celery", "-A", f"benchmarks.apps.{scenario.app}", "worker",
               "-P", scenario.pool, "-c", str(scenario.concurrency), "-Q", queue,
               "-n", f"{scenario.name}-{round_}@%h", "-l", "warning",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **dict(scenario.env)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # The runner publishes outside the proxy where the worker's broker is behind it.
        client_broker = env.get("BENCH_CLIENT_BROKER", env.get("BENCH_BROKER", BROKER_URL))
        yield Worker(scenario, queue, process, log_path, client_broker)
    finally:
        stop_worker(process)


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown; the whole process group killed if it takes over a minute."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class Worker:
    def __init__(self, scenario: Scenario, queue: str, process: subprocess.Popen[bytes],
                 log_path: Path, broker: str = BROKER_URL) -> None:
        self.scenario = scenario
        self.queue = queue
        self.process = process
        self.log_path = log_path
        self.app = Celery("bench_client", broker=broker, backend=BACKEND_URL)
        self.app.conf.broker_connection_retry_on_startup = True
        # Read directly, even where the worker's backend is behind the benchmark's proxy.
        self.results = redis.Redis.from_url(BACKEND_URL)
        self._next_user = 0

    def processes(self) -> list[psutil.Process]:
        main = psutil.Process(self.process.pid)
        return [main, *main.children(recursive=True)]

    def publish(self, workload: str, count: int) -> list[str]:
        ids = []
        with self.app.producer_or_acquire() as producer:
            for _ in range(count):
                args = (self._user_id(),) if workload == "orm" else ()
                result = self.app.send_task(f"bench.{workload}", args, queue=self.queue,
                                            producer=producer)
                ids.append(result.id)
        return ids

    def _user_id(self) -> int:
        self._next_user = self._next_user % USERS + 1
        return self._next_user

    def wait(self, ids: list[str], timeout_s: float) -> tuple[list[dict[str, object]], int]:
        """The stored results of ``ids``, and how many did not arrive within ``timeout_s``."""
        pending = {f"celery-task-meta-{task_id}" for task_id in ids}
        found: list[dict[str, object]] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the {self.scenario.name} worker exited; see {self.log_path}")
            keys = list(pending)
            for key, raw in zip(keys, self.results.mget(keys)):
                if raw is not None:
                    pending.discard(key)
                    found.append(loads(raw))
            if pending:
                time.sleep(0.05)
        return found, len(pending)

    def warm_up(self, workload: str, timeout_s: float = 120) -> None:
        """Run a few tasks first: the worker is up and every child has connected."""
        count = max(4 * self.scenario.concurrency, 20)
        _, missing = self.wait(self.publish(workload, count), timeout_s)
        if missing:
            raise SystemExit(f"the {self.scenario.name} worker did not answer {missing} warm-up "
                             f"tasks in {timeout_s}s; see {self.log_path}")

    def run_batch(self, workload: str, count: int, round_: int, timeout_s: float) -> Batch:
        cpu_before = self._cpu_seconds()
        with Sampler(self) as sampler:
            started = time.time()
            ids = self.publish(workload, count)
            results, missing = self.wait(ids, timeout_s)
        cpu = self._cpu_seconds() - cpu_before
        finished = max((_timestamp(r["date_done"]) for r in results), default=time.time())
        failures = missing + sum(1 for r in results if r["status"] != "SUCCESS")
        self.results.flushdb()
        return Batch(self.scenario.name, workload, round_, count, finished - started, failures,
                     sampler.peak_connections, sampler.peak_pss / 2**20,
                     1000 * cpu / count)

    def _cpu_seconds(self) -> float:
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total


def _timestamp(value: object) -> float:
    return datetime.fromisoformat(str(value)).timestamp()


class Sampler:
    """Polls the database's connection count and the worker's memory (PSS) while a batch runs."""

    CONNECTIONS_EVERY_S = 0.02
    MEMORY_EVERY_S = 0.25

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.peak_connections = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="bench-sampler", daemon=True)
        self._database = DATABASE.rpartition("/")[2]

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        next_memory = 0.0
        with psycopg.connect(f"postgresql://{DATABASE}", autocommit=True) as connection:
            while not self._stop.is_set():
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    (self._database,)).fetchone()
                self.peak_connections = max(self.peak_connections, row[0] if row else 0)
                if time.monotonic() >= next_memory:
                    self.peak_pss = max(self.peak_pss, self._pss())
                    next_memory = time.monotonic() + self.MEMORY_EVERY_S
                self._stop.wait(self.CONNECTIONS_EVERY_S)

    def _pss(self) -> int:
        total = 0
        for process in self.worker.processes():
            try:
                total += process.memory_full_info().pss
            except psutil.NoSuchProcess:
                continue
        return total
