"""``python -m benchmarks.loop_lag``: a child's loop while a CPU-bound sync task runs beside it.

Starts a real ``-P asyncsql -c 3`` worker with one child (``benchmarks.apps.loop``)
per switch interval given, and in interleaved rounds measures two coroutines
of that child, alone and beside ``loop.burn`` (pure-Python CPU work on the
child's sync thread): a timer due every 10 ms (its lag: p50, p99, max) and
``SELECT 1`` round trips (per second). Then the cost of publishing from a
coroutine: its first call (which connects the producer) and the rest, with
the timer lag of a sibling meanwhile. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Celery

from .settings import BACKEND_URL, BROKER_URL
from .worker import ROOT, stop_worker

TIMER_INTERVAL_S = 0.01


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measurement")
    parser.add_argument("--switch-intervals", type=float, nargs="+", default=[0.005, 0.001],
                        help="sys.setswitchinterval values in the child (0.005: Python's)")
    options = parser.parse_args(argv)
    client = Celery("loop_lag_client", broker=BROKER_URL, backend=BACKEND_URL)
    client.conf.broker_connection_retry_on_startup = True
    for interval in options.switch_intervals:
        with running_worker(interval) as queue:
            print(f"\n## sys.setswitchinterval({interval}) in the child\n")
            publishing(client, queue)
            beside_burn(client, queue, options.rounds, options.seconds)


@contextmanager
def running_worker(switch_interval_s: float) -> Iterator[str]:
    """A ``-P asyncsql -c 3`` worker with one child, ready; its queue."""
    queue = f"loop-lag-{uuid.uuid4().hex[:8]}"
    command = [sys.executable, "-m", "celery", "-A", "benchmarks.apps.loop", "worker",
               "-P", "asyncsql", "-c", "3", "-Q", queue, "-n", f"{queue}@%h", "-l", "warning",
               "--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "LOOP_SWITCH_INTERVAL_S": str(switch_interval_s)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        yield queue
    finally:
        stop_worker(process)


def call(client: Celery, queue: str, name: str, *args: Any) -> Any:
    return client.send_task(name, args, queue=queue)


def publishing(client: Celery, queue: str) -> None:
    """What publishing 500 messages from a coroutine costs it and a sibling's timers."""
    call(client, queue, "loop.noop").get(timeout=120)  # the worker is up
    sink = f"{queue}-sink"
    probe = call(client, queue, "loop.probe", 3.0, TIMER_INTERVAL_S)
    costs = call(client, queue, "loop.publish", 500, sink, 0.001).get(timeout=60)
    lag = probe.get(timeout=60)
    redis.Redis.from_url(BROKER_URL).delete(sink)
    rest = costs["rest"]
    print(f"publish from a coroutine: first call {ms(costs['first'])} (connects the producer), "
          f"then p50 {ms(rest['p50'])}, p99 {ms(rest['p99'])}, max {ms(rest['max'])} "
          f"over {rest['n']} calls; a sibling's 10 ms timer meanwhile: "
          f"p50 {ms(lag['p50'])}, p99 {ms(lag['p99'])}, max {ms(lag['max'])}\n")


def beside_burn(client: Celery, queue: str, rounds: int, seconds: float) -> None:
    """Timer lag and queries per second alone and beside ``loop.burn``, medians of rounds."""
    alone: list[dict[str, Any]] = []
    loaded: list[dict[str, Any]] = []
    for round_ in range(rounds):
        order = (False, True) if round_ % 2 == 0 else (True, False)
        for with_burn in order:
            (loaded if with_burn else alone).append(measure(client, queue, seconds, with_burn))
    rows = [("timer lag p50", "p50", ms), ("timer lag p99", "p99", ms),
            ("timer lag max", "max", ms), ("SELECT 1 per second", "qps", "{:.0f}".format)]
    print("| coroutine measure | alone | beside a CPU-bound sync task | ratio |")
    print("|---|---|---|---|")
    for label, key, show in rows:
        a = statistics.median(m[key] for m in alone)
        b = statistics.median(m[key] for m in loaded)
        print(f"| {label} | {show(a)} | {show(b)} | {b / a:.3g}x |")
    burn = statistics.median(m["burn"] for m in loaded)
    print(f"\nthe sync task's own work: {burn:.0f} rounds per second (median of {rounds})")


def measure(client: Celery, queue: str, seconds: float, with_burn: bool) -> dict[str, Any]:
    burn = call(client, queue, "loop.burn", seconds + 1.0) if with_burn else None
    time.sleep(0.5)  # the burn is running before the coroutines start
    probe = call(client, queue, "loop.probe", seconds, TIMER_INTERVAL_S)
    queries = call(client, queue, "loop.queries", seconds)
    result = {**probe.get(timeout=120), "qps": queries.get(timeout=120)}
    if burn is not None:
        result["burn"] = burn.get(timeout=120) / (seconds + 1.0)
    return result


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


if __name__ == "__main__":
    main()
