"""The fleet's connection budget: three hosts on one PostgreSQL whose ``max_connections``
the test lowers. Each worker advertises its budget in ``inspect stats``; a starting worker
(warns) and ``celery asyncsql check`` (fails) add up the running workers' and their own when
the server would be overfilled, naming the workers and the figures; ``pg_stat_activity``
names each connection's worker.
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


def test_check_names_the_workers_that_would_overfill_the_server_with_one_more(tmp_path):
    with fleet(tmp_path, hosts=3) as hosts, \
            postgres_server(hosts.shared, max_connections=MAX_CONNECTIONS) as url:
        first, second, third = hosts.hosts
        server = f"{hosts.shared}:{url.rsplit(':', 1)[1].split('/')[0]}"
        with hosts.worker(first, concurrency=SLOTS, database_url=url, conf=DEFAULT_NAMES) as a, \
                hosts.worker(second, concurrency=SLOTS, database_url=url,
                             conf=DEFAULT_NAMES) as b:
            before = _check(hosts, url)  # before a third starts: 20 + 20 running, 20 more: 60 > 47
            with hosts.worker(third, concurrency=SLOTS, database_url=url,
                              conf=DEFAULT_NAMES) as c:
                shares = ", ".join(f"{w.hostname} 20"
                                   for w in sorted((a, b), key=lambda w: w.hostname))
                c.wait_for_log(f"asyncsql pool at start-up: Server {server}: the fleet may "
                               f"open 60 connections ({shares}; this worker {c.hostname} 20)"
                               ", above the 47", timeout_s=5)
                backend = RedisBackend(app=app, url=hosts.results_url)
                ids = hosts.publish([(tasks.connection_name, (1.0,))] * 30)
                names = Counter(app.AsyncResult(i, backend=backend).get(timeout=60) for i in ids)
                with psycopg.connect(url.replace("+asyncpg", "").replace(
                        hosts.shared, "127.0.0.1")) as conn:
                    held = dict(conn.execute(
                        "SELECT application_name, count(*) FROM pg_stat_activity "
                        "WHERE application_name LIKE '%asyncsql default' GROUP BY 1").fetchall())
                done = _check(hosts, url)
                workers = sorted((a, b, c), key=lambda w: w.hostname)
    assert before.returncode == 1, before.stdout + before.stderr
    shares = ", ".join(f"{w.hostname} 20" for w in sorted((a, b), key=lambda w: w.hostname))
    assert f"Server {server}: the fleet may open 60 connections ({shares}; this check's " \
           "worker 20), above the 47 it takes from roles that are not superusers " \
           "(max_connections 50 less 3 reserved)" in before.stderr, before.stderr
    assert set(names) <= {f"{w.hostname} asyncsql default" for w in workers}, names
    assert set(held) == set(names), (held, names)  # idle in their pools, named by worker
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"fleet: 80 connections to {server} with the 3 running asyncsql " \
           "worker(s) that use it" in done.stdout, done.stdout
    shares = ", ".join(f"{w.hostname} 20" for w in workers)
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

