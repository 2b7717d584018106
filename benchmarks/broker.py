"""``python -m benchmarks.broker``: the worker's broker round trips, kombu's transport and ours.

Every message costs the worker's parent several Redis round trips on stock
kombu (a ``BRPOP`` per message, a pipeline to record it, one to ack it), so
with Redis ~1 ms away a worker of any ``-c`` runs about as fast as prefork's
no-op. This run compares, side by side in interleaved rounds, the same
workers on kombu's Redis transport (``stock``, the control) and on
``celery_asyncpool.broker:Transport``:

- Redis (broker and result backend) behind the benchmark's delay proxy, the
  runner publishing outside it: ``-c 100`` on ``io`` and ``noop``, against
  prefork's no-op (on both transports);
- Redis on loopback: ``-c 100`` no-op and ``tiny`` against prefork's no-op;
- RabbitMQ as the broker, through a proxy of the same delay and on loopback
  (the Redis backend through the proxy in both): whether the parent waits a
  round trip per message there too.

Writes ``broker.md``, ``broker.json`` and ``broker.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import sys
from pathlib import Path

import redis

from .__main__ import _measure
from .models import prepare_database
from .remote import PROXY_PORT, _far, chart, command_counts, delay_proxy, markdown, summarize
from .report import Run, Target
from .scenarios import Scenario
from .settings import AMQP_URL, BACKEND_URL, BROKER_URL, SYNC_URL, USERS
from .worker import ROOT

OURS = ("BENCH_BROKER_TRANSPORT", "celery_asyncpool.broker:Transport")
FAR = (("BENCH_BROKER", _far(BROKER_URL)), ("BENCH_BACKEND", _far(BACKEND_URL)),
       ("BENCH_CLIENT_BROKER", BROKER_URL))
AMQP_PROXY_PORT = 16391
AMQP_FAR = f"amqp://guest:guest@127.0.0.1:{AMQP_PROXY_PORT}//"
ON_AMQP = (("BENCH_BACKEND", _far(BACKEND_URL)), ("BENCH_CLIENT_BROKER", AMQP_URL))
COMMANDS = ("brpop", "rpop", "evalsha", "eval", "multi", "exec", "zadd", "hset", "zrem")
SCENARIOS = (
    Scenario("far-prefork-stock", "prefork", 2, "common", ("noop",),
             "prefork -c 2 no-op, kombu's transport, Redis through the proxy", FAR),
    Scenario("far-prefork", "prefork", 2, "common", ("noop",),
             "prefork -c 2 no-op, our transport, Redis through the proxy", (*FAR, OURS)),
    Scenario("far-100-stock", "asyncsql", 100, "asyncsql", ("io", "noop"),
             "-P asyncsql -c 100, kombu's transport, Redis through the proxy", FAR),
    Scenario("far-100", "asyncsql", 100, "asyncsql", ("io", "noop"),
             "-P asyncsql -c 100, our transport, Redis through the proxy", (*FAR, OURS)),
    Scenario("far-amqp-prefork", "prefork", 2, "common", ("noop",),
             "prefork -c 2 no-op, RabbitMQ and the Redis backend through the proxy",
             (("BENCH_BROKER", AMQP_FAR), *ON_AMQP)),
    Scenario("far-amqp-100", "asyncsql", 100, "asyncsql", ("io", "noop"),
             "-P asyncsql -c 100, RabbitMQ and the Redis backend through the proxy",
             (("BENCH_BROKER", AMQP_FAR), *ON_AMQP)),
    Scenario("near-amqp-100", "asyncsql", 100, "asyncsql", ("io", "noop"),
             "-P asyncsql -c 100, RabbitMQ on loopback, the Redis backend through the proxy",
             (("BENCH_BROKER", AMQP_URL), *ON_AMQP)),
    Scenario("prefork-stock", "prefork", 2, "common", ("noop",),
             "prefork -c 2 no-op, kombu's transport, Redis on loopback"),
    Scenario("loop-100-stock", "asyncsql", 100, "asyncsql", ("noop", "tiny"),
             "-P asyncsql -c 100, kombu's transport, Redis on loopback"),
    Scenario("loop-100", "asyncsql", 100, "asyncsql", ("noop", "tiny"),
             "-P asyncsql -c 100, our transport, Redis on loopback", (OURS,)),
)
TARGETS = (
    Target("far-100", "io", "far-prefork-stock", "noop", 3.0),
    Target("far-100", "io", "far-100-stock", "io", 2.5),
    # A round trip per message in the parent would make RabbitMQ 1 ms away much slower.
    Target("far-amqp-100", "io", "near-amqp-100", "io", 0.8),
    Target("loop-100", "noop", "prefork-stock", "noop", 1.5),
    Target("loop-100", "tiny", "prefork-stock", "noop", 1.0),
    Target("loop-100", "tiny", "loop-100-stock", "tiny", 1.0),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.broker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per batch (at least "
                        "10 per slot)")
    parser.add_argument("--delay-ms", type=float, default=1.0,
                        help="added to each round trip to the proxied Redis (default 1)")
    parser.add_argument("--scenarios", nargs="+", metavar="NAME",
                        choices=[s.name for s in SCENARIOS], help="only these (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    scenarios = tuple(s for s in SCENARIOS if not args.scenarios or s.name in args.scenarios)
    prepare_database(SYNC_URL, USERS)
    server = redis.Redis.from_url(BROKER_URL)
    for url in (BROKER_URL, BACKEND_URL):
        redis.Redis.from_url(url).flushdb()
    counter = functools.partial(command_counts, server)
    counts = {w: args.tasks for w in ("io", "noop", "tiny")}
    batches = []
    with delay_proxy(args.delay_ms) as rtt_ms, \
            delay_proxy(args.delay_ms, AMQP_URL, AMQP_PROXY_PORT):
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(scenarios)
            for scenario in scenarios[shift:] + scenarios[:shift]:
                batches += _measure(scenario, round_, counts, args.out / "logs", counter)
    run = Run(scenarios, batches)
    command = shlex.join(["python", "-m", "benchmarks.broker",
                          *(sys.argv[1:] if argv is None else argv)])
    document = summarize(run, [], rtt_ms, command, TARGETS, COMMANDS)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "broker.json").write_text(json.dumps(document, indent=2) + "\n")
    text = markdown(document, "The broker's round trips, kombu's transport and ours",
                    "on the Redis server (broker and backend: the worker's and the runner's "
                    f"publishes; proxy port {PROXY_PORT})")
    (args.out / "broker.md").write_text(text)
    chart(document, args.out / "broker.png", "Redis {rtt:.1f} ms away and on loopback")
    print(text)


if __name__ == "__main__":
    main()
