"""A PgBouncer of the test's own in transaction mode, in front of the machine's PostgreSQL.

Debian's ``pgbouncer`` package (``.ci/run`` installs it). PgBouncer will not run
as root: started as root, it drops to the ``postgres`` user (``-u``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def pgbouncer(pool_size: int = 2, listen: tuple[str, ...] = ("127.0.0.1",),
              database: str = "test", max_client_conn: int = 1000) -> Iterator[int]:
    """PgBouncer with ``pool_mode = transaction`` and ``pool_size`` server connections
    for ``database`` (served under the same name), listening on the ``listen`` addresses;
    its port, stopped by its PID."""
    from tests.celery_suite.run import free_port, server

    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        pytest.fail("pgbouncer is not installed: the test runs a PgBouncer of its own "
                    "(apt-get install pgbouncer; .ci/run does)", pytrace=False)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pgbouncer-") as folder:
        work = Path(folder)
        work.chmod(0o777)  # PgBouncer writes its log here as postgres
        config = work / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"{database} = host=127.0.0.1 port=5432 dbname={database} user=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = {','.join(listen)}\nlisten_port = {port}\nunix_socket_dir =\n"
            "auth_type = any\npool_mode = transaction\n"
            f"default_pool_size = {pool_size}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            f"max_client_conn = {max_client_conn}\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {work / 'pgbouncer.log'}\n")
        config.chmod(0o644)
        command = [binary, *(["-u", "postgres"] if os.geteuid() == 0 else []), str(config)]
        with server(command, port, "PgBouncer",
                    fail=lambda message: pytest.fail(message, pytrace=False)):
            yield port
