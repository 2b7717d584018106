"""A fleet of worker hosts on this machine: one network namespace per host (tests/netns.py),
each with one link to this machine, where the fleet's own Redis (broker and results) and
its own PgBouncer (transaction mode, in front of the machine's PostgreSQL) listen on
every link's address. A host whose link goes down is cut off from both, as a host whose
network fails: nothing is closed, packets are dropped.

The tasks' database is ``asyncsql_fleet`` of its own, so that PostgreSQL's backends for
it are PgBouncer's server connections alone: ``Peak`` samples them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests import netns
from tests.faults.accounting import Account, settle
from tests.celery_suite.run import free_port
from tests.integration.conftest import PG_DSN, RABBITMQ_URL, Worker, redis_server, run_worker
from tests.integration.pgbouncer import pgbouncer

from . import tasks

DATABASE = "asyncsql_fleet"
SERVER_POOL = 20  # PgBouncer's default_pool_size: PostgreSQL's connections for the fleet
OBSERVER = "fleet-observer"  # the application_name of the test's own connections to it
FLEET_DSN = PG_DSN.rsplit("/", 1)[0] + f"/{DATABASE}?application_name={OBSERVER}"


@dataclass
class Row:
    """One scenario's line of the fleet table (printed by conftest.py)."""

    scenario: str
    hosts: int
    slots: int
    account: Account
    peak: int

    def cells(self) -> list[str]:
        a = self.account
        failed = ", ".join(f"{n} {reason}" for reason, n in sorted(a.failed.items())) or "0"
        return [self.scenario, str(self.hosts), str(self.slots), str(a.sent), str(a.once),
                str(a.again), failed, str(len(a.missing)), str(self.peak)]


ROWS: list[Row] = []
NOTES: list[str] = []  # measured figures of scenarios that are not a batch of tasks


def prepare_database(dsn: str = FLEET_DSN) -> None:
    """``asyncsql_fleet`` (or the database of ``dsn``) with the tasks' tables; its accounts
    back at 0."""
    if dsn == FLEET_DSN:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (DATABASE,)).fetchone() is None:
                conn.execute(f"CREATE DATABASE {DATABASE}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in tasks.SCHEMA:
            conn.execute(statement)
        conn.execute("UPDATE fleet_account SET balance = 0")


def ledger(run: str, dsn: str = FLEET_DSN) -> Counter[str]:
    """How many effects each task of ``run`` committed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT task_id, count(*) FROM fleet_ledger WHERE run = %s "
                            "GROUP BY task_id", (run,)).fetchall()
    return Counter({task_id: n for task_id, n in rows})


def ran_on(run: str, dsn: str = FLEET_DSN) -> Counter[str]:
    """Effects of ``run`` per host (a worker's node name is ``<host>@<machine>``)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT split_part(worker, '@', 1), count(*) FROM fleet_ledger "
                            "WHERE run = %s GROUP BY 1", (run,)).fetchall()
    return Counter({worker: n for worker, n in rows})


def balances_and_increments(run: str) -> tuple[int, int]:
    """The accounts' total and the read-modify-commit effects of ``run``: equal when every
    increment was committed with its effect, and no other."""
    with psycopg.connect(FLEET_DSN, autocommit=True) as conn:
        total = conn.execute("SELECT sum(balance) FROM fleet_account").fetchone()[0]
        effects = conn.execute("SELECT count(*) FROM fleet_ledger WHERE run = %s AND "
                               "kind = 'read-modify-commit'", (run,)).fetchone()[0]
    return int(total), int(effects)


class Peak:
    """The most backends PostgreSQL had for ``asyncsql_fleet`` (or ``database`` on the
    server of ``dsn``) at once, sampled every 20 ms, the test's own connections left out."""

    def __init__(self, dsn: str = PG_DSN, database: str = DATABASE) -> None:
        self.value = 0
        self._dsn, self._database = dsn, database
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        with psycopg.connect(self._dsn, autocommit=True, application_name=OBSERVER) as conn:
            while not self._stop.is_set():
                count = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                                     "AND application_name <> %s AND backend_type = "
                                     "'client backend'", (self._database, OBSERVER)).fetchone()[0]
                self.value = max(self.value, int(count))
                self._stop.wait(0.02)


@dataclass
class Fleet:
    """Hosts and the services they share; workers started with ``worker``."""

    hosts: list[netns.Host]
    broker_port: int
    bouncer_port: int
    tmp_path: Path
    shared: str  # an address of this machine every host reaches by that name
    amqp_port: int | None = None  # RabbitMQ's forwarder on each link, for a RabbitMQ fleet
    queue: str = field(default_factory=lambda: f"fleet-{uuid.uuid4().hex[:8]}")

    @property
    def results_url(self) -> str:
        return f"redis://127.0.0.1:{self.broker_port}/1"

    @contextlib.contextmanager
    def worker(self, host: netns.Host, *, concurrency: int = 100, conf: dict | None = None,
               transport: str | None = None, database_url: str | None = None
               ) -> Iterator[Worker]:
        """A worker on ``host`` (its node name the host's), ready; warm shut down after.

        Its database is the fleet's PgBouncer unless ``database_url`` names another.
        """
        address = host.links["net"].address
        bouncer = f"postgresql+asyncpg://postgres@{address}:{self.bouncer_port}/{DATABASE}"
        settings = {"asyncsql_processes": 1, "asyncsql_pgbouncer": database_url is None,
                    "asyncsql_fleet_check_s": 1.0, **(conf or {})}
        if transport:
            settings["broker_transport"] = transport
        env = {"ITEST_BACKEND": f"redis://{address}:{self.broker_port}/1",
               "ITEST_DATABASE_URL": database_url or bouncer}
        broker = (f"redis://{address}:{self.broker_port}/0" if self.amqp_port is None
                  else f"amqp://guest:guest@{address}:{self.amqp_port}//")
        with run_worker(self.tmp_path, concurrency=concurrency, include=tasks.INCLUDE,
                        conf=settings, env=env, queue=self.queue, host=host, name=host.name,
                        broker=broker) as worker:
            yield worker

    def publish(self, batch: list[tuple[object, tuple]]) -> list[str]:
        """Send each ``(task, args)`` to the fleet's queue, from this machine; their ids."""
        from tests.integration.app import app

        broker = (f"redis://127.0.0.1:{self.broker_port}/0" if self.amqp_port is None
                  else RABBITMQ_URL)
        with app.connection_for_write(broker) as conn:
            producer = app.amqp.Producer(conn)
            return [task.apply_async(args=args, queue=self.queue, producer=producer).id
                    for task, args in batch]

    def settle(self, scenario: str, ids: list[str], run: str, *, slots: int, peak: Peak,
               timeout_s: float = 180, dsn: str = FLEET_DSN) -> Account:
        """Wait for every task's outcome, account for each (effects in ``dsn``'s ledger),
        and add the scenario's row."""
        account = settle(f"fleet: {scenario}", ids, run=run, timeout_s=timeout_s,
                         redis_url=self.results_url, report=False,
                         ledger=functools.partial(ledger, dsn=dsn))
        ROWS.append(Row(scenario, len(self.hosts), slots, account, peak.value))
        return account


def mixed_batch(run: str, count: int, hold_s: float = 0.0) -> list[tuple[object, tuple]]:
    """``count`` tasks, the four kinds in turn: read-modify-commit on one of the shared
    accounts, a 20 ms ``pg_sleep``, a rollback on error, a retry."""
    kinds = [lambda n: (tasks.read_modify_commit, (run, 1 + n % tasks.ACCOUNTS, hold_s)),
             lambda n: (tasks.sleep_20ms, (run, hold_s)),
             lambda n: (tasks.rollback_on_error, (run, hold_s)),
             lambda n: (tasks.retry_once, (run, hold_s))]
    return [kinds[n % len(kinds)](n) for n in range(count)]


@contextlib.contextmanager
def fleet(tmp_path: Path, hosts: int = 3, broker: str = "redis") -> Iterator[Fleet]:
    """``hosts`` worker hosts, and the Redis (broker unless ``broker`` is "amqp", and
    results) and PgBouncer they share.

    The machine's RabbitMQ listens on 127.0.0.1 alone: a host reaches it through a
    forwarder on its link, which passes a cut on as silence. RabbitMQ then learns of
    the cut from the worker's missing heartbeats (``broker_heartbeat``), as of a host
    that died.
    """
    prepare_database()
    with contextlib.ExitStack() as stack:
        made = [stack.enter_context(netns.host("net")) for _ in range(hosts)]
        shared = stack.enter_context(netns.shared_address())
        for host in made:
            host.route(shared, "net")
        addresses = tuple(host.links["net"].address for host in made)
        redis_url = stack.enter_context(redis_server(bind=addresses))
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        bouncer = stack.enter_context(pgbouncer(SERVER_POOL, listen=("127.0.0.1", *addresses),
                                                database=DATABASE))
        amqp_port = None
        if broker == "amqp":
            amqp_port = free_port()
            for address in addresses:
                stack.enter_context(netns.forward(address, amqp_port, ("127.0.0.1", 5672)))
        yield Fleet(made, redis_port, bouncer, tmp_path, shared, amqp_port)
