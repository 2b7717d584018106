"""``python -m benchmarks.remote``: Celery's own I/O with its services a round trip away.

Where Redis is on another host (0.5-2 ms away: a managed Redis, another
zone), a worker whose children store results synchronously on their loops is
capped by those round trips. This run puts the result backend behind the
benchmark's delay proxy (``benchmarks.proxy``, a process of its own, the same
for every scenario) and compares, side by side in interleaved rounds:

- RabbitMQ broker, Redis backend ~1 ms away, ``-c 100`` on ``io``: the store
  off the loop (``far``) against the same worker with the backend on loopback
  (``near``) and against Celery's synchronous store (``far-sync``, the
  control: ``asyncsql_results_off_loop = False``); Redis commands per task;
- Redis broker and backend on loopback: ``-c 100`` no-op and ``tiny`` against
  the control, ``-c 2`` no-op against prefork's;
- a sibling coroutine's 5 ms timer in a child whose other slots store 100 KB
  results ~1 ms away, off the loop and on it, and with no stores.

Writes ``remote.md`` and ``remote.json`` to ``--out`` and prints the report.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil
import redis

from . import report
from .__main__ import _measure
from .models import prepare_database
from .proxy import measured_rtt_ms
from .report import Run, Target
from .scenarios import Scenario
from .settings import AMQP_URL, BACKEND_URL, BROKER_URL, SYNC_URL, USERS
from .worker import ROOT, running_worker

PROXY_PORT = 16390
BIG_RESULT = 100_000  # characters per stored result in the timer-lag run
LAG_INTERVAL_S = 0.005
# Redis commands counted per task; the runner's own MGETs and FLUSHDBs are not.
COMMANDS = ("get", "set", "setex", "evalsha", "eval", "publish", "multi", "exec")


def _far(url: str) -> str:
    """``url`` (a loopback Redis URL) reached through the proxy instead."""
    scheme, _, rest = url.partition("://")
    database = rest.partition("/")[2]
    return f"{scheme}://127.0.0.1:{PROXY_PORT}/{database}"


SYNC_STORE = ("BENCH_RESULTS_OFF_LOOP", "0")
ON_AMQP = ("BENCH_BROKER", AMQP_URL)
FAR = ("BENCH_BACKEND", _far(BACKEND_URL))
IO_ONLY = ("io",)
SCENARIOS = (
    Scenario("near", "asyncsql", 100, "asyncsql", IO_ONLY,
             "-P asyncsql -c 100, RabbitMQ broker, Redis backend on loopback", (ON_AMQP,)),
    Scenario("far", "asyncsql", 100, "asyncsql", IO_ONLY,
             "-P asyncsql -c 100, RabbitMQ broker, Redis backend through the proxy",
             (ON_AMQP, FAR)),
    Scenario("far-sync", "asyncsql", 100, "asyncsql", IO_ONLY,
             "far with asyncsql_results_off_loop = False: Celery's synchronous store",
             (ON_AMQP, FAR, SYNC_STORE)),
    Scenario("loopback-100", "asyncsql", 100, "asyncsql", ("noop", "tiny"),
             "-P asyncsql -c 100, Redis broker and backend on loopback"),
    Scenario("loopback-100-sync", "asyncsql", 100, "asyncsql", ("noop", "tiny"),
             "loopback-100 with Celery's synchronous store", (SYNC_STORE,)),
    Scenario("asyncsql-2", "asyncsql", 2, "asyncsql", ("noop",),
             "-P asyncsql -c 2, Redis broker and backend on loopback"),
    Scenario("prefork-noop", "prefork", 2, "common", ("noop",),
             "prefork -c 2, a sync task that does nothing"),
)
TARGETS = (
    Target("far", "io", "near", "io", 0.85),
    Target("far", "io", "far-sync", "io", 2.0),
    Target("loopback-100", "noop", "loopback-100-sync", "noop", 1.0),
    Target("loopback-100", "tiny", "loopback-100-sync", "tiny", 1.0),
    Target("asyncsql-2", "noop", "prefork-noop", "noop", 0.95),
)
# The timer-lag run: one child, one probe and 20 slots storing big results.
LAG_CHILD = (("BENCH_PROCESSES", "1"), FAR)
LAG_SCENARIOS = (
    Scenario("lag", "asyncsql", 21, "asyncsql", (), "store off the loop", LAG_CHILD),
    Scenario("lag-sync", "asyncsql", 21, "asyncsql", (), "Celery's synchronous store",
             (*LAG_CHILD, SYNC_STORE)),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remote",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per batch (at least "
                        "10 per slot)")
    parser.add_argument("--delay-ms", type=float, default=1.0,
                        help="added to each round trip to the proxied Redis (default 1)")
    parser.add_argument("--lag-seconds", type=float, default=4.0)
    parser.add_argument("--stores-per-s", type=float, default=100.0,
                        help="100 KB results stored per second beside the timer")
    parser.add_argument("--scenarios", nargs="+", metavar="NAME",
                        choices=[s.name for s in SCENARIOS], help="only these (default: all)")
    parser.add_argument("--skip-lag", action="store_true", help="leave out the timer-lag run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    scenarios = tuple(s for s in SCENARIOS if not args.scenarios or s.name in args.scenarios)
    prepare_database(SYNC_URL, USERS)
    server = redis.Redis.from_url(BACKEND_URL)
    for url in (BROKER_URL, BACKEND_URL):
        redis.Redis.from_url(url).flushdb()
    with delay_proxy(args.delay_ms) as rtt_ms:
        batches, lags = [], []
        counts = {w: args.tasks for w in ("io", "noop", "tiny")}
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(scenarios)
            for scenario in scenarios[shift:] + scenarios[:shift]:
                # With RabbitMQ as the broker, the backend's commands are the tasks' own.
                counter = functools.partial(command_counts, server)
                batches += _measure(scenario, round_, counts, args.out / "logs",
                                    counter if ON_AMQP in scenario.env else None)
            if not args.skip_lag:
                lags += timer_lag_round(round_, args, args.out / "logs")
    run = Run(scenarios, batches)
    command = shlex.join(["python", "-m", "benchmarks.remote",
                          *(sys.argv[1:] if argv is None else argv)])
    document = summarize(run, lags, rtt_ms, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "remote.json").write_text(json.dumps(document, indent=2) + "\n")
    text = markdown(document)
    (args.out / "remote.md").write_text(text)
    chart(document, args.out / "remote.png")
    print(text)


@contextmanager
def delay_proxy(delay_ms: float, url: str = BACKEND_URL,
                port: int = PROXY_PORT) -> Iterator[float]:
    """The proxy in a process of its own, on ``port`` in front of the server of ``url``.

    Yields the round trip it gives, measured with Redis PINGs (0.0 for another server).
    """
    target = url.partition("://")[2].partition("/")[0].rpartition("@")[2]
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.proxy", "--listen", str(port), "--to", target,
         "--delay-ms", str(delay_ms)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        process.stdout.readline()  # it listens
        yield measured_rtt_ms(port) if url.startswith("redis") else 0.0
    finally:
        process.terminate()
        process.wait(10)


def command_counts(server: redis.Redis) -> dict[str, int]:
    stats = server.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"]) for name, value in stats.items()}


def timer_lag_round(round_: int, args: argparse.Namespace, logs: Path) -> list[dict[str, Any]]:
    """The probe's lag alone and beside big stores, on both stores; one child each."""
    found = []
    for scenario in LAG_SCENARIOS if round_ % 2 else LAG_SCENARIOS[::-1]:
        with running_worker(scenario, round_, logs) as worker:
            worker.warm_up("noop")
            child = worker.processes()[-1]
            for stores in (False, True):
                lag, cpu = probe_lag(worker, child, args, stores)
                found.append({"scenario": scenario.name, "round": round_, "stores": stores,
                              "cpu_share": cpu, **lag})
                print(f"round {round_} {scenario.name:>9} {'stores' if stores else 'alone':>6}: "
                      f"timer lag p50 {lag['p50'] * 1000:.2f} ms, p99 {lag['p99'] * 1000:.2f} "
                      f"ms, child CPU {cpu:.0%}", flush=True)
    return found


def probe_lag(worker: Any, child: psutil.Process, args: argparse.Namespace,
              stores: bool) -> tuple[dict[str, float], float]:
    """The timer lag of a probe coroutine, with big results stored beside it or not."""
    probe = worker.app.send_task("bench.lag", (args.lag_seconds, LAG_INTERVAL_S),
                                 queue=worker.queue)
    cpu_before, started = sum(child.cpu_times()[:2]), time.monotonic()
    ids = []
    if stores:
        every = 1 / args.stores_per_s
        while (elapsed := time.monotonic() - started) < args.lag_seconds:
            ids.append(worker.app.send_task("bench.big", (BIG_RESULT,), queue=worker.queue).id)
            time.sleep(max(0.0, (len(ids) * every) - elapsed))
    lag = probe.get(timeout=60 + args.lag_seconds)
    cpu = (sum(child.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started)
    _, missing = worker.wait(ids, 60)
    if missing:
        raise SystemExit(f"{missing} big results were not stored; see {worker.log_path}")
    worker.results.flushdb()
    return lag, cpu


def summarize(run: Run, lags: list[dict[str, Any]], rtt_ms: float, command: str,
              targets_: tuple[Target, ...] = TARGETS,
              commands: tuple[str, ...] = COMMANDS) -> dict[str, Any]:
    rows = []
    for scenario in run.scenarios:
        for workload in scenario.workloads:
            batches = run.of(scenario.name, workload)
            rows.append({"scenario": scenario.name, "workload": workload,
                         "throughput": statistics.median(b.throughput for b in batches),
                         "cpu_ms_per_task": statistics.median(b.cpu_ms_per_task
                                                              for b in batches),
                         "failures": sum(b.failures for b in batches),
                         "peak_connections": max(b.peak_connections for b in batches)})
    per_task = {}
    for scenario in run.scenarios:
        counted = [b for b in run.batches if b.scenario == scenario.name and b.commands]
        if counted:
            per_task[scenario.name] = {c: statistics.median(b.commands.get(c, 0) / b.tasks
                                                            for b in counted) for c in commands}
    targets = []
    for target in targets_:
        ratio = run.ratio(target.scenario, target.workload, target.versus,
                          target.versus_workload)
        if ratio is not None:
            targets.append({**asdict(target), "ratio": ratio, "met": target.met(ratio)})
    lag_rows: dict[str, dict[str, float]] = {}
    for scenario in LAG_SCENARIOS if lags else ():
        for stores in (False, True):
            mine = [lag for lag in lags if (lag["scenario"], lag["stores"]) == (scenario.name,
                                                                                 stores)]
            lag_rows[f"{scenario.name}{'+stores' if stores else ''}"] = {
                key: statistics.median(lag[key] for lag in mine)
                for key in ("p50", "p99", "max", "cpu_share")}
    if lag_rows:
        bound = max(0.005, 2 * lag_rows["lag"]["p99"])
        beside = lag_rows["lag+stores"]["p99"]
        targets.append({"scenario": "lag", "workload": "timer p99 beside stores",
                        "versus": "max(5 ms, 2x p99 alone)", "ratio": beside, "bound": bound,
                        "met": beside <= bound})
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": report.machine(), "command": command, "rounds": len(run.rounds),
            "proxy_rtt_ms": rtt_ms, "rows": rows, "targets": targets,
            "commands": list(commands), "commands_per_task": per_task, "timer_lag": lag_rows,
            "scenarios": [asdict(s) for s in (*run.scenarios, *(LAG_SCENARIOS if lags else ()))],
            "batches": [asdict(b) for b in run.batches]}


def markdown(doc: dict[str, Any], title: str = "Celery's I/O a round trip away",
             counted: str = "on the backend (RabbitMQ broker runs)") -> str:
    commands = doc.get("commands", COMMANDS)
    lines = [f"# {title}, {doc['date']}", "",
             f"Machine: {doc['machine']}.", "",
             f"Run: `{doc['command']}`; {doc['rounds']} interleaved rounds, medians; each "
             "ratio taken within a round, then the median quoted. The proxied Redis answered "
             f"a PING in {doc['proxy_rtt_ms']:.2f} ms (loopback: ~0.05 ms).", "",
             "| scenario | workload | tasks/s | CPU ms/task | failures | peak PG conns |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['scenario']} | {r['workload']} | {r['throughput']:.0f} "
              f"| {r['cpu_ms_per_task']:.2f} | {r['failures']} | {r['peak_connections']} |"
              for r in doc["rows"]]
    lines += ["", f"Redis commands per task {counted}:", "",
              "| scenario | " + " | ".join(commands) + " |",
              "|---|" + "---:|" * len(commands)]
    lines += [f"| {name} | " + " | ".join(f"{counts[c]:.2f}" for c in commands) + " |"
              for name, counts in doc["commands_per_task"].items()]
    if doc["timer_lag"]:
        lines += ["", f"A coroutine's {LAG_INTERVAL_S * 1000:.0f} ms timer in a child whose 20 "
                  f"other slots store {BIG_RESULT // 1000} KB results through the proxy:", "",
                  "| child | timer lag p50 | p99 | max | child CPU |",
                  "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {row['p50'] * 1000:.2f} ms | {row['p99'] * 1000:.2f} ms "
              f"| {row['max'] * 1000:.2f} ms | {row['cpu_share']:.0%} |"
              for name, row in doc["timer_lag"].items()]
    lines += ["", "| check | measured | target | met |", "|---|---:|---:|---|"]
    for t in doc["targets"]:
        if t["scenario"] == "lag":
            lines.append(f"| timer p99 beside stores (off the loop) | {t['ratio'] * 1000:.2f} ms "
                         f"| <= {t['bound'] * 1000:.2f} ms | {'yes' if t['met'] else 'NO'} |")
        else:
            lines.append(f"| tasks/s: {t['scenario']} {t['workload']} vs {t['versus']} "
                         f"{t['versus_workload']} | {t['ratio']:.2f}x | >= {t['bound']}x "
                         f"| {'yes' if t['met'] else 'NO'} |")
    lines += ["", "## Scenarios", ""]
    lines += [f"- `{s['name']}`: {s['summary']}." for s in doc["scenarios"]]
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path,
          heading: str = "Redis backend {rtt:.1f} ms away vs loopback") -> None:
    """Tasks/s per scenario and workload, and the timer lag's p99, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("tasks/s", [(f"{r['scenario']} {r['workload']}", r["throughput"])
                           for r in doc["rows"]])]
    if doc["timer_lag"]:
        panels.append(("timer lag p99, ms", [(name, row["p99"] * 1000)
                                             for name, row in doc["timer_lag"].items()]))
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for axis, (title, bars) in zip(axes[0], panels):
        names = [name for name, _ in bars]
        values = [value for _, value in bars]
        colours = ["tab:grey" if any(word in n for word in ("sync", "prefork", "stock"))
                   else "tab:green" for n in names]
        axis.barh(names, values, color=colours)
        axis.invert_yaxis()
        axis.set_title(title)
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:.0f}" if value >= 10 else f" {value:.2f}",
                      va="center", fontsize=8)
        axis.set_xlim(0, max(values) * 1.25)
    figure.suptitle(f"{heading.format(rtt=doc['proxy_rtt_ms'])}; grey: controls "
                    f"({doc['date']})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
