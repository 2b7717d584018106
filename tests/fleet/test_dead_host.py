"""A worker host that dies holding database connections: no FIN reaches PostgreSQL, whose
backends for it would hold their ``max_connections`` slots for the kernel's keepalive
(about 2 hours). ``asyncsql_dead_host_timeout_s`` has the server drop them within it; a
host with the setting off is the control.
"""

from __future__ import annotations

import time

import psycopg

from tests.integration.conftest import eventually

from . import tasks
from .fleet import NOTES, fleet
from .postgres import postgres_server

TIMEOUT_S = 8
MARGIN_S = 12  # a shared 2-core machine; 9.0 s measured alone, once over 14 s under load


def test_a_dead_hosts_connections_are_freed_within_the_setting_and_not_without(tmp_path):
    with fleet(tmp_path, hosts=2) as hosts, \
            postgres_server(hosts.shared, max_connections=100) as url:
        timed, control = hosts.hosts
        conf = {"asyncsql_engine_options": {}}  # connections named after their worker
        with hosts.worker(timed, concurrency=10, database_url=url,
                          conf={**conf, "asyncsql_dead_host_timeout_s": TIMEOUT_S}) as a, \
                hosts.worker(control, concurrency=10, database_url=url,
                             conf={**conf, "asyncsql_dead_host_timeout_s": None}) as b:
            observer = url.replace("+asyncpg", "").replace(hosts.shared, "127.0.0.1")

            def backends() -> dict[str, int]:
                with psycopg.connect(observer, autocommit=True) as conn:
                    return dict(conn.execute(
                        "SELECT split_part(application_name, ' ', 1), count(*) "
                        "FROM pg_stat_activity WHERE application_name LIKE '% asyncsql %' "
                        "GROUP BY 1").fetchall())

            ids = hosts.publish([(tasks.connection_name, (0.5,))] * 60)
            eventually(lambda: backends().get(a.hostname, 0) and backends().get(b.hostname, 0),
                       60, f"both hosts holding connections ({len(ids)} tasks sent)")
            held = backends()
            for host in (timed, control):
                host.down("net")
                host.kill_all()
            died = time.monotonic()
            eventually(lambda: a.hostname not in backends(), TIMEOUT_S + MARGIN_S,
                       f"the dead host's backends gone (held {held})", interval_s=0.25)
            freed_after = time.monotonic() - died
            left = backends()
    assert held[a.hostname] > 0 and held[b.hostname] > 0
    assert left.get(b.hostname) == held[b.hostname], \
        f"the control's backends stay without the setting: {left} (held {held})"
    NOTES.append(f"a dead host's {held[a.hostname]} backends freed {freed_after:.1f} s after "
                 f"it died (asyncsql_dead_host_timeout_s = {TIMEOUT_S}); the control's "
                 f"{held[b.hostname]} still held")
