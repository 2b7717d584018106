"""``python -m benchmarks.peers``: taskiq and dramatiq next to ``-P asyncsql -c 100``.

Each round runs, on loopback and with Redis (broker and results) behind the
benchmark's delay proxy (the runner publishing outside it), the ``noop`` and
``io`` workloads on three workers of 100 tasks in flight: ``-P asyncsql -c
100`` on the project's Redis transport, taskiq (2 worker processes x
``--max-async-tasks 50``) and dramatiq (``--processes 2 --threads 50``). A
batch is timed from its first publish to the moment every result is stored
(Celery: the latest ``date_done``; the others: when the runner, polling every
5 ms, sees the last one). CPU ms per task is the whole worker process tree's.
Ratios are ours over theirs in the same round; the table gives medians.

Writes ``peers.md`` and ``peers.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from ..broker import FAR, OURS
from ..models import prepare_database
from ..remote import _far, delay_proxy
from ..scenarios import Scenario
from ..settings import SYNC_URL, USERS
from ..worker import ROOT, running_worker, stop_worker
from . import BACKEND_URL, BROKER_URL, PROCESSES, SLOTS

WORKLOADS = ("noop", "io")
SYSTEMS = ("asyncsql", "taskiq", "dramatiq")
PEER_FAR = (("BENCH_PEER_BROKER", _far(BROKER_URL)), ("BENCH_PEER_BACKEND", _far(BACKEND_URL)))


@dataclass
class Result:
    placement: str  # "loopback" or "far"
    system: str
    workload: str
    round: int
    tasks: int
    seconds: float
    missing: int
    cpu_ms_per_task: float

    @property
    def throughput(self) -> float:
        return self.tasks / self.seconds


def peer_command(system: str) -> list[str]:
    if system == "taskiq":
        return [sys.executable, "-m", "taskiq", "worker", "benchmarks.peers.taskiq_app:broker",
                "--workers", str(PROCESSES), "--max-async-tasks", str(SLOTS),
                "--ack-type", "when_received", "--log-level", "WARNING"]
    return [sys.executable, "-m", "dramatiq", "benchmarks.peers.dramatiq_app",
            "--processes", str(PROCESSES), "--threads", str(SLOTS), "--queues", "bench"]


class Peer:
    """A taskiq or dramatiq worker; the runner publishes to it on the broker directly."""

    def __init__(self, system: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.system = system
        self.process = process
        self.log = log
        self.results = redis.Redis.from_url(BACKEND_URL)
        if system == "taskiq":
            from . import taskiq_app as app
        else:
            from . import dramatiq_app as app  # type: ignore[no-redef]
        self.app = app

    def publish(self, workload: str, count: int) -> None:
        task = self.app.TASKS[workload]
        if self.system == "dramatiq":
            for _ in range(count):
                task.send()
            return

        async def kiq() -> None:
            await self.app.broker.startup()
            try:
                for _ in range(count):
                    await task.kiq()
            finally:
                await self.app.broker.shutdown()
        asyncio.run(kiq())

    def run(self, workload: str, count: int, timeout_s: float) -> tuple[float, int]:
        """Seconds from the first publish until ``count`` results are stored; how many did not."""
        self.results.flushdb()
        started = time.monotonic()
        self.publish(workload, count)
        deadline = started + timeout_s
        while (stored := self.results.dbsize()) < count and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the {self.system} worker exited; see {self.log}")
            time.sleep(0.005)
        return time.monotonic() - started, max(0, count - stored)


@contextmanager
def peer_worker(system: str, env: dict[str, str], logs: Path, round_: int) -> Iterator[Peer]:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"peer-{system}-round{round_}.log"
    redis.Redis.from_url(BROKER_URL).flushdb()
    with open(log, "wb") as out:
        process = subprocess.Popen(peer_command(system), cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    try:
        yield Peer(system, process, log)
    finally:
        stop_worker(process)


def cpu_seconds(pid: int) -> float:
    main = psutil.Process(pid)
    total = 0.0
    for process in [main, *main.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(system: str, placement: str, round_: int, count: int, logs: Path) -> list[Result]:
    far = placement == "far"
    results = []
    if system == "asyncsql":
        scenario = Scenario(f"peers-{placement}", "asyncsql", 100, "asyncsql", WORKLOADS,
                            "-P asyncsql -c 100, the project's transport",
                            (*FAR, OURS) if far else (OURS,))
        with running_worker(scenario, round_, logs) as worker:
            for workload in WORKLOADS:
                worker.warm_up(workload)
                batch = worker.run_batch(workload, count, round_, timeout_s=60 + count / 5)
                results.append(Result(placement, system, workload, round_, count, batch.seconds,
                                      batch.failures, batch.cpu_ms_per_task))
        return results
    with peer_worker(system, dict(PEER_FAR) if far else {}, logs, round_) as peer:
        for workload in WORKLOADS:
            _, missing = peer.run(workload, 2 * PROCESSES * SLOTS, 120)  # warm-up: up, connected
            if missing:
                raise SystemExit(f"the {system} worker missed {missing} warm-up tasks; "
                                 f"see {peer.log}")
            before = cpu_seconds(peer.process.pid)
            seconds, missing = peer.run(workload, count, 60 + count / 5)
            cpu = cpu_seconds(peer.process.pid) - before
            results.append(Result(placement, system, workload, round_, count, seconds, missing,
                                  1000 * cpu / count))
    return results


def summarize(results: list[Result]) -> list[dict[str, Any]]:
    """Per placement, workload and system: median throughput, CPU, and our ratio to it."""
    rows = []
    for placement in ("loopback", "far"):
        for workload in WORKLOADS:
            ours = {r.round: r for r in results
                    if (r.placement, r.system, r.workload) == (placement, "asyncsql", workload)}
            for system in SYSTEMS:
                mine = [r for r in results
                        if (r.placement, r.system, r.workload) == (placement, system, workload)]
                if not mine:
                    continue
                ratios = [ours[r.round].throughput / r.throughput for r in mine if r.round in ours]
                rows.append({
                    "placement": placement, "workload": workload, "system": system,
                    "tasks_per_s": statistics.median(r.throughput for r in mine),
                    "rounds": [round(r.throughput) for r in mine],
                    "cpu_ms_per_task": statistics.median(r.cpu_ms_per_task for r in mine),
                    "missing": sum(r.missing for r in mine),
                    "ours_over_it": statistics.median(ratios) if ratios else None,
                })
    return rows


def markdown(rows: list[dict[str, Any]], rtt_ms: float, command: str) -> str:
    lines = [
        "# taskiq and dramatiq next to -P asyncsql -c 100",
        "",
        f"`{command}`: 100 tasks in flight each (ours: `-P asyncsql -c 100` on "
        f"`celery_asyncpool.broker:Transport`; taskiq: {PROCESSES} processes x "
        f"`--max-async-tasks {SLOTS}`; dramatiq: `--processes {PROCESSES} --threads {SLOTS}` "
        f"with `AsyncIO`). far: broker and results through the delay proxy, "
        f"PING {rtt_ms:.2f} ms. Medians of the rounds; ours/it is the median of the "
        "same-round ratios.",
        "",
        "| Redis | workload | worker | tasks/s | rounds | CPU ms/task | missing | ours / it |",
        "|---|---|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        ratio = "" if row["system"] == "asyncsql" else f"{row['ours_over_it']:.2f}x"
        lines.append(f"| {row['placement']} | {row['workload']} | {row['system']} | "
                     f"{row['tasks_per_s']:.0f} | {', '.join(map(str, row['rounds']))} | "
                     f"{row['cpu_ms_per_task']:.2f} | {row['missing']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per batch")
    parser.add_argument("--delay-ms", type=float, default=1.0)
    parser.add_argument("--placements", nargs="+", choices=("loopback", "far"),
                        default=["loopback", "far"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    prepare_database(SYNC_URL, USERS)
    results: list[Result] = []
    with delay_proxy(args.delay_ms) as rtt_ms:
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(SYSTEMS)
            for placement in args.placements:
                for system in SYSTEMS[shift:] + SYSTEMS[:shift]:
                    for result in measure(system, placement, round_, args.tasks,
                                          args.out / "logs"):
                        results.append(result)
                        print(f"round {round_} {placement:>8} {system:>8} {result.workload:>4}: "
                              f"{result.throughput:7.0f} tasks/s, {result.missing} missing, "
                              f"{result.cpu_ms_per_task:.2f} CPU ms/task", flush=True)
    command = shlex.join(["python", "-m", "benchmarks.peers",
                          *(sys.argv[1:] if argv is None else argv)])
    rows = summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(
        {"command": command, "rtt_ms": rtt_ms, "rows": rows,
         "batches": [asdict(r) for r in results]}, indent=2) + "\n")
    text = markdown(rows, rtt_ms, command)
    (args.out / "peers.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
