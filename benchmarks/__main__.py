"""``python -m benchmarks``: interleaved rounds of every scenario, then the report.

Each round starts every scenario's worker in turn (the order rotates from
round to round), warms it up, and times one batch per workload. The Redis
databases named by BENCH_BROKER and BENCH_BACKEND are flushed: they belong
to the benchmark.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import redis

from . import profile, report
from .models import prepare_database
from .scenarios import Scenario, select
from .settings import BACKEND_URL, BROKER_URL, SYNC_URL, USERS
from .worker import ROOT, Batch, running_worker

# Tasks per batch, as a multiple of --tasks: the I/O-bound task waits 20 ms,
# the no-op costs next to nothing.
SHARE = {"tiny": 1.0, "orm": 1.0, "io": 0.3, "noop": 2.0}


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    scenarios = select(args.scenarios)
    counts = {w: max(1, round(args.tasks * share)) for w, share in SHARE.items()}
    print(f"Seeding {USERS} users; scenarios: {', '.join(s.name for s in scenarios)}", flush=True)
    prepare_database(SYNC_URL, USERS)
    for url in (BROKER_URL, BACKEND_URL):
        redis.Redis.from_url(url).flushdb()
    if args.profile:
        name, _, workload = args.profile.partition(":")
        scenario = next((s for s in scenarios if s.name == name), None)
        if scenario is None or workload not in scenario.workloads:
            raise SystemExit(f"--profile {args.profile}: expected SCENARIO:WORKLOAD, "
                             "e.g. asyncsql:tiny or asyncsql-100:io")
        profile.record(scenario, workload, counts[workload], args.out)
        return
    batches: list[Batch] = []
    for round_ in range(1, args.rounds + 1):
        shift = (round_ - 1) % len(scenarios)
        for scenario in scenarios[shift:] + scenarios[:shift]:
            batches += _measure(scenario, round_, counts, args.out / "logs")
    run = report.Run(scenarios, batches)
    command = shlex.join(["scripts/benchmark", *(sys.argv[1:] if argv is None else argv)])
    report.write(run, args.out, {"command": command, "rounds": args.rounds, "tasks": counts})
    print((args.out / "results.md").read_text())


def _measure(scenario: Scenario, round_: int, counts: dict[str, int], logs: Path,
             commands: Callable[[], dict[str, int]] | None = None) -> list[Batch]:
    """One batch per workload of ``scenario``; ``commands`` counts what a Redis ran in each."""
    batches = []
    with running_worker(scenario, round_, logs) as worker:
        for workload in scenario.workloads:
            worker.warm_up(workload)
            # At least 10 tasks per slot: a batch must be long next to the time
            # a worker with many slots takes to fill them.
            count = max(counts[workload], 10 * scenario.concurrency)
            before = commands() if commands else {}
            batch = worker.run_batch(workload, count, round_, timeout_s=60 + count / 5)
            if commands:
                batch.commands = {k: v - before.get(k, 0) for k, v in commands().items()}
            print(f"round {round_} {scenario.name:>13} {workload:>5}: "
                  f"{batch.throughput:7.0f} tasks/s, {batch.failures} failed, "
                  f"{batch.peak_connections} PG conns, {batch.cpu_ms_per_task:.2f} CPU ms/task",
                  flush=True)
            batches.append(batch)
            time.sleep(0.5)  # let the worker settle: acks, result writes of the warm-up
    return batches


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scripts/benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--tasks", type=int, default=1000,
                        help="tasks per batch for tiny and orm; io gets 0.3x, noop 2x "
                             "(default 1000)")
    parser.add_argument("--scenarios", nargs="+", metavar="NAME",
                        help="only these scenarios (and the baselines they are compared to)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for results.md, results.json, throughput.png and logs")
    parser.add_argument("--profile", metavar="SCENARIO:WORKLOAD", nargs="?",
                        const="asyncsql:tiny",
                        help="instead of the rounds, profile one scenario's workload with py-spy "
                             "(default asyncsql:tiny)")
    return parser


if __name__ == "__main__":
    main()
