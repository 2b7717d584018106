"""What is compared: each scenario is a real ``celery worker`` process with one way of running the tasks."""

from __future__ import annotations

from dataclasses import dataclass

DATABASE_WORKLOADS = ("tiny", "orm", "io")
WORKLOADS = (*DATABASE_WORKLOADS, "noop")

# Each workload's ratios are taken to this scenario, measured in the same round.
BASELINE = {"tiny": "common", "orm": "common", "io": "common", "noop": "prefork-noop"}


@dataclass(frozen=True)
class Scenario:
    name: str
    pool: str
    concurrency: int
    app: str  # module under benchmarks.apps
    workloads: tuple[str, ...]
    summary: str
    env: tuple[tuple[str, str], ...] = ()  # for the worker (and where it publishes)


SCENARIOS = (
    Scenario("common", "prefork", 2, "common", DATABASE_WORKLOADS,
             "prefork -c 2, sync task calling asyncio.run() per task, NullPool engine"),
    Scenario("sync-psycopg", "prefork", 2, "sync", DATABASE_WORKLOADS,
             "prefork -c 2, plain sync SQLAlchemy + psycopg, pooled engine built after fork"),
    Scenario("hand-loop", "prefork", 2, "handloop", DATABASE_WORKLOADS,
             "prefork -c 2, a loop + pooled async engine per child by hand, "
             "loop.run_until_complete per task"),
    Scenario("threads-8", "threads", 8, "common", DATABASE_WORKLOADS,
             "-P threads -c 8, asyncio.run() per task, NullPool engine"),
    Scenario("prefork-noop", "prefork", 2, "common", ("noop",),
             "prefork -c 2, a sync task that does nothing: the ceiling for any pool here"),
    Scenario("asyncsql", "asyncsql", 2, "asyncsql", WORKLOADS,
             "-P asyncsql -c 2, async def tasks on each child's loop and pooled engine"),
    Scenario("asyncsql-uvloop", "asyncsql", 2, "asyncsql_uvloop", WORKLOADS,
             "-P asyncsql -c 2 as asyncsql, with asyncsql_loop = 'uvloop'"),
    Scenario("asyncsql-20", "asyncsql", 20, "asyncsql", DATABASE_WORKLOADS,
             "-P asyncsql -c 20: 2 children, 10 tasks in flight each"),
    Scenario("asyncsql-100", "asyncsql", 100, "asyncsql", DATABASE_WORKLOADS,
             "-P asyncsql -c 100: 2 children, 50 tasks in flight each"),
)


def select(names: list[str] | None) -> tuple[Scenario, ...]:
    """The scenarios named, in table order; every baseline a chosen workload needs comes too."""
    if not names:
        return SCENARIOS
    known = {scenario.name for scenario in SCENARIOS}
    unknown = sorted(set(names) - known)
    if unknown:
        raise SystemExit(f"unknown scenarios {unknown}; choose from {sorted(known)}")
    wanted = set(names)
    for scenario in SCENARIOS:
        if scenario.name in names:
            wanted.update(BASELINE[w] for w in scenario.workloads)
    return tuple(s for s in SCENARIOS if s.name in wanted)
