"""What a worker holds, seen from outside: PostgreSQL connections, descriptors, threads, memory.

The load tests read these before and after a burst, and watch connections
during it on a thread of their own (``Peak``). Each watcher keeps one
connection of its own open: under load the server may be near its
``max_connections``, and a count must not need a new connection then.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from types import TracebackType

import psutil
import psycopg

from tests.integration.conftest import PG_DSN

PG_PORT = 5432


class Connections:
    """Counts a worker's connections in pg_stat_activity, by its application_name."""

    def __init__(self) -> None:
        self._conn = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=10)

    def states(self, app_name: str) -> Counter[str]:
        """How many of its connections are in each state (``idle``, ``active``, ...)."""
        rows = self._conn.execute("SELECT coalesce(state, ''), count(*) FROM pg_stat_activity "
                                  "WHERE application_name = %s GROUP BY 1", (app_name,))
        return Counter({state: n for state, n in rows.fetchall()})

    def count(self, app_name: str) -> int:
        return sum(self.states(app_name).values())

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Connections:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


class Peak:
    """Samples the connections of some application_names on a thread, keeps each peak."""

    def __init__(self, *names: str, interval_s: float = 0.05) -> None:
        self.peaks = dict.fromkeys(names, 0)
        self.total = 0
        self._interval_s = interval_s
        self._connections = Connections()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._connections.close()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            counts = {name: self._connections.count(name) for name in self.peaks}
            self.total = max(self.total, sum(counts.values()))
            for name, count in counts.items():
                self.peaks[name] = max(self.peaks[name], count)


@dataclass(frozen=True)
class Holdings:
    """What one process holds: descriptors, its PostgreSQL sockets among them, threads, USS;
    and the CPU time it has used so far."""

    pid: int
    fds: int
    pg_sockets: int
    threads: int
    uss: int
    cpu_s: float

    @property
    def other_fds(self) -> int:
        """Descriptors other than PostgreSQL connections: an engine's idle pool may rightly
        grow up to its size under load, nothing else should."""
        return self.fds - self.pg_sockets


def holdings(pid: int) -> Holdings:
    """What process ``pid`` holds now (USS: the memory it alone would give back on exit)."""
    process = psutil.Process(pid)
    with process.oneshot():
        sockets = process.net_connections(kind="tcp")
        return Holdings(pid=pid, fds=process.num_fds(),
                        pg_sockets=sum(1 for c in sockets if c.raddr and c.raddr.port == PG_PORT),
                        threads=process.num_threads(), uss=process.memory_full_info().uss,
                        cpu_s=sum(process.cpu_times()[:2]))
