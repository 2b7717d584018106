"""The fleet's connection budget: three hosts on one PostgreSQL whose ``max_connections``
the test lowers. Each worker advertises its budget in ``inspect stats``; the one that
tips the server over warns at start-up, ``celery asyncsql check`` fails, both naming the
workers and the figures; ``pg_stat_activity`` names each connection's worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import psycopg
from celery.backends.redis import RedisBackend

from tests.integration.app import app
from tests.integration.conftest import ROOT

from . import tasks
from .fleet import fleet
from .postgres import postgres_server

SLOTS = 20  # one child: a pool of 20 connections, each worker's budget
# 50 less the 3 superuser slots leaves 47: two workers (40) fit, the third (60) does not.
MAX_CONNECTIONS = 50
DEFAULT_NAMES = {"asyncsql_engine_options": {}}  # the test app names connections itself


def test_the_worker_that_overfills_the_server_warns_naming_the_fleet_and_check_fails(tmp_path):
    with fleet(tmp_path, hosts=3) as hosts, \
            postgres_server(hosts.shared, max_connections=MAX_CONNECTIONS) as url:
        first, second, third = hosts.hosts
        with hosts.worker(first, concurrency=SLOTS, database_url=url, conf=DEFAULT_NAMES) as a, \
                hosts.worker(second, concurrency=SLOTS, database_url=url,
                             conf=DEFAULT_NAMES) as b, \
                hosts.worker(third, concurrency=SLOTS, database_url=url,
                             conf=DEFAULT_NAMES) as c:
            server = f"{hosts.shared}:{url.rsplit(':', 1)[1].split('/')[0]}"
            needle = f"Server {server}: the fleet may open 60 connections ("
            c.wait_for_log(needle)
            warning = next(line for line in c.logs().splitlines() if needle in line)
            assert f"{a.hostname} 20" in warning and f"{b.hostname} 20" in warning, warning
            assert f"this worker {c.hostname} 20), above the 47 it takes" in warning, warning
            assert "the fleet may open" not in a.logs() + b.logs()  # 20, then 40: they fit

            backend = RedisBackend(app=app, url=hosts.results_url)
            ids = hosts.publish([(tasks.connection_name, (1.0,))] * 30)
            names = Counter(app.AsyncResult(i, backend=backend).get(timeout=60) for i in ids)
            assert set(names) <= {f"{w.hostname} asyncsql default" for w in (a, b, c)}, names
            with psycopg.connect(url.replace("+asyncpg", "").replace(
                    hosts.shared, "127.0.0.1")) as conn:
                held = dict(conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity "
                    "WHERE application_name LIKE '%asyncsql default' GROUP BY 1").fetchall())
            assert set(held) == set(names), (held, names)  # idle in their pools, by name

            done = _check(hosts, url)
            assert done.returncode == 1, done.stdout + done.stderr
            assert f"fleet: 80 connections to {server} with the 3 running asyncsql " \
                   "worker(s) that use it" in done.stdout, done.stdout
            shares = ", ".join(f"{w.hostname} 20" for w in sorted((a, b, c),
                                                                  key=lambda w: w.hostname))
            assert f"Server {server}: the fleet may open 80 connections ({shares}; this " \
                   "check's worker 20), above the 47" in done.stderr, done.stderr


def _check(hosts, url: str) -> subprocess.CompletedProcess:
    """``celery asyncsql check -c 20`` from this machine, on the fleet's broker."""
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "ITEST_BROKER": f"redis://127.0.0.1:{hosts.broker_port}/0",
           "ITEST_BACKEND": hosts.results_url, "ITEST_DATABASE_URL": url,
           "ITEST_CONF": json.dumps({"asyncsql_processes": 1, **DEFAULT_NAMES})}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.integration.app",
                           "asyncsql", "check", "-c", str(SLOTS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=90)

