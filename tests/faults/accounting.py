"""The account every fault test ends with: what became of each task it sent.

Each task sent is exactly one of: ran once, ran again (at-least-once, by
design), failed with a stored reason, or missing. A task is missing when no
outcome was stored by the deadline, or when it was stored as a success but its
effect is not in the database.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psycopg
import redis
from celery.backends.database import DatabaseBackend

from tests.integration.app import BACKEND_URL
from tests.integration.conftest import PG_DSN, REDIS_URL

TERMINAL = {"SUCCESS", "FAILURE", "REVOKED"}

# Filled by the tests, printed by the suite's terminal summary (conftest.py).
ACCOUNTS: list[Account] = []
FIGURES: list[tuple[str, str]] = []


@dataclass
class Account:
    fault: str
    sent: int
    once: int = 0
    again: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    missing: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)  # one stored message per reason

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def row(self) -> tuple[str, ...]:
        failed = ", ".join(f"{n} {reason}" for reason, n in sorted(self.failed.items())) or "0"
        return (self.fault, str(self.sent), str(self.once), str(self.again), failed,
                str(len(self.missing)))


def stored(task_ids: list[str], backend: DatabaseBackend | None = None,
           redis_url: str = BACKEND_URL) -> dict[str, dict]:
    """The result metadata the Redis result backend holds for ``task_ids`` (absent: not stored).

    Given ``backend``, Celery's database result backend, what that one holds.
    """
    if backend is not None:
        return stored_in(backend, task_ids)
    client = redis.Redis.from_url(redis_url)
    found: dict[str, dict] = {}
    try:
        for start in range(0, len(task_ids), 1000):
            chunk = task_ids[start:start + 1000]
            for task_id, raw in zip(chunk, client.mget([f"celery-task-meta-{t}" for t in chunk])):
                if raw is not None:
                    found[task_id] = json.loads(raw)
    finally:
        client.close()
    return found


def stored_in(backend: DatabaseBackend, task_ids: list[str]) -> dict[str, dict]:
    """The outcomes a database result backend holds, shaped as the Redis backend stores them.

    Which tasks have an outcome comes from one query per thousand ids; only a
    task that did not succeed is read whole, for its reason.
    """
    statuses: dict[str, str] = {}
    session = backend.ResultSession()
    try:
        for start in range(0, len(task_ids), 1000):
            chunk = task_ids[start:start + 1000]
            query = session.query(backend.task_cls.task_id, backend.task_cls.status)
            statuses.update(query.filter(backend.task_cls.task_id.in_(chunk)).all())
    finally:
        session.close()
    found: dict[str, dict] = {}
    for task_id, status in statuses.items():
        result = None if status == "SUCCESS" else backend.get_task_meta(task_id)["result"]
        if isinstance(result, BaseException):
            result = {"exc_type": type(result).__name__, "exc_message": str(result)}
        found[task_id] = {"status": status, "result": result}
    return found


def effects(run: str) -> Counter[str]:
    """How many ledger rows each task of ``run`` wrote."""
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        rows = conn.execute("SELECT task_id, count(*) FROM fault_ledger WHERE run = %s "
                            "GROUP BY task_id", (run,)).fetchall()
    return Counter({task_id: n for task_id, n in rows})


def wait_settled(task_ids: list[str], timeout_s: float,
                 backend: DatabaseBackend | None = None,
                 redis_url: str = BACKEND_URL) -> dict[str, dict]:
    """Poll the backend until every task has a terminal state or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        metas = stored(task_ids, backend, redis_url)
        settled = sum(1 for meta in metas.values() if meta["status"] in TERMINAL)
        if settled == len(task_ids) or time.monotonic() > deadline:
            return metas
        time.sleep(0.5)


def settle(fault: str, task_ids: Iterable[str], *, run: str | None, timeout_s: float = 120,
           backend: DatabaseBackend | None = None, redis_url: str = BACKEND_URL,
           ledger: Callable[[str], Counter[str]] | None = None, report: bool = True) -> Account:
    """Wait for every task's outcome, then account for each; the account is also reported.

    ``run`` names the ledger rows of tasks that write an effect; None for tasks
    that write none, which are then accounted by their stored state alone.
    Outcomes are read from the Redis result backend (``redis_url``), or from
    Celery's database result backend ``backend`` when given; effects are counted by
    ``ledger`` (``fault_ledger``'s rows by default). ``report=False`` leaves it out of the
    fault suite's table (the caller has one of its own).
    """
    task_ids = list(task_ids)
    metas = wait_settled(task_ids, timeout_s, backend, redis_url)
    counts = (ledger or effects)(run) if run is not None else None
    account = Account(fault, len(task_ids))
    for task_id in task_ids:
        _classify(account, task_id, metas.get(task_id), counts)
    if report:
        ACCOUNTS.append(account)
    return account


def _classify(account: Account, task_id: str, meta: dict | None,
              counts: Counter[str] | None) -> None:
    status = meta["status"] if meta else "PENDING"
    if status == "SUCCESS":
        ran = 1 if counts is None else counts[task_id]
        if ran == 1:
            account.once += 1
        elif ran > 1:
            account.again += 1
        else:
            account.missing.append(task_id)  # stored as done, yet its effect is not there
    elif status in ("FAILURE", "REVOKED"):
        result = meta["result"] or {}
        reason = result.get("exc_type", status) if isinstance(result, dict) else status
        account.failed[reason] += 1
        account.reasons.setdefault(reason, str(result.get("exc_message", ""))[:200]
                                   if isinstance(result, dict) else "")
    else:
        account.missing.append(task_id)


def publish(worker, task, count: int, *args, **options) -> list[str]:
    """Publish ``count`` calls of ``task`` to ``worker`` on one producer; return their ids."""
    from tests.integration.app import app

    on_its_broker = (app.producer_or_acquire() if worker.broker == REDIS_URL
                     else app.amqp.Producer(worker.connection()))
    with on_its_broker as producer:
        return [worker.send(task, *args, producer=producer, **options).id for _ in range(count)]


def figure(name: str, value: str) -> None:
    """Report a load figure (peak connections, memory growth) beside the accounts."""
    FIGURES.append((name, value))


def table(rows: Iterable[Iterable[str]], figures: Iterable[Iterable[str]]) -> list[str]:
    """Accounts' rows (``Account.row``) as a Markdown table, then the figures."""
    lines = ["| fault | sent | ran once | ran again | failed with reason | missing |",
             "|---|---:|---:|---:|---|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    figures = [tuple(figure) for figure in figures]
    if figures:
        lines += ["", "| figure | value |", "|---|---|"]
        lines += [f"| {name} | {value} |" for name, value in figures]
    return lines
