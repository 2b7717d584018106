"""A PostgreSQL server of the test's own (``initdb``), for settings the machine's server
must keep: its ``max_connections`` lowered, on an address the test chooses.

Debian's server binaries (``/usr/lib/postgresql/<version>/bin``); as root, the
cluster is made and run as the ``postgres`` user, which the server requires.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest


def _binaries() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL's server binaries (initdb) are not installed: the test runs a "
                    "server of its own (apt-get install postgresql)", pytrace=False)
    return Path(found[-1]).parent


@contextlib.contextmanager
def postgres_server(address: str, *, max_connections: int) -> Iterator[str]:
    """A fresh cluster listening on ``address`` and 127.0.0.1, with ``max_connections``;
    its ``postgresql+asyncpg`` URL on ``address`` (database ``postgres``, trust auth).
    Stopped by its PID (SIGINT: PostgreSQL's fast shutdown)."""
    from tests.celery_suite.run import free_port

    binaries, port = _binaries(), free_port()
    as_postgres = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    with tempfile.TemporaryDirectory(prefix="asyncsql-pg-") as folder:
        os.chmod(folder, 0o777)
        data = Path(folder) / "data"
        subprocess.run([binaries / "initdb", "-D", data, "-A", "trust", "-U", "postgres",
                        "--no-sync"], check=True, capture_output=True, **as_postgres)
        with open(data / "pg_hba.conf", "a") as hba:  # the test's hosts, on their links
            hba.write("host all all 0.0.0.0/0 trust\n")
        server = subprocess.Popen(
            [binaries / "postgres", "-D", data, "-p", str(port), "-k", folder,
             "-c", f"listen_addresses=127.0.0.1,{address}",
             "-c", f"max_connections={max_connections}", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **as_postgres)
        try:
            _wait_until_ready(port, server)
            yield f"postgresql+asyncpg://postgres@{address}:{port}/postgres"
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(30)


def _wait_until_ready(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(psycopg.OperationalError), psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2):
            return
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the test's own PostgreSQL did not start on port {port}", pytrace=False)
        time.sleep(0.1)
