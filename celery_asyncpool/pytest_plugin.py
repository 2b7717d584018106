"""Pytest fixtures: a real ``celery worker -P asyncsql`` for a test session.

Loaded through the ``pytest11`` entry point once the package is installed.
Name your Celery app's module in ``pytest.ini`` (or override the fixture)::

    [pytest]
    asyncsql_worker_app = proj.tasks

then ask for ``asyncsql_worker``: a worker subprocess, started once per
session, ready before the first test that uses it, stopped by its PID with a
warm shutdown at the end. The tests send it tasks through the app as usual.
Fixtures are named and overridden as in ``celery.contrib.pytest``
(``celery_worker_parameters`` there, ``asyncsql_worker_parameters`` here).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("asyncsql_worker_app",
                  "Module path of the Celery app the asyncsql_worker fixture starts (-A).")
    parser.addini("asyncsql_worker_concurrency",
                  "Task slots (-c) of the asyncsql_worker fixture's worker.", default="2")
    parser.addini("asyncsql_worker_args",
                  "More 'celery worker' arguments for the asyncsql_worker fixture, "
                  "shell-quoted (e.g. -Q myqueue --loglevel debug).", default="")


class AsyncsqlWorker:
    """A running ``celery worker`` subprocess (in a session of its own) and its log."""

    def __init__(self, proc: subprocess.Popen[bytes], hostname: str, log_path: Path) -> None:
        self.proc = proc
        self.hostname = hostname
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        """Everything the worker has logged so far."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until ``text`` appears in the log.

        Raises:
            RuntimeError: the worker exited, or ``timeout_s`` passed; with the log.
        """
        deadline = time.monotonic() + timeout_s
        while text not in self.logs():
            if self.proc.poll() is not None:
                raise RuntimeError(f"The asyncsql worker exited with {self.proc.returncode} "
                                   f"before logging {text!r}; its log:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"The asyncsql worker did not log {text!r} within "
                                   f"{timeout_s}s; its log:\n{self.logs()}")
            time.sleep(0.1)

    def inspect(self, app: Any, timeout_s: float = 2.0) -> Any:
        """``app.control.inspect`` for this worker alone (``.stats()``, ``.active()``...)."""
        return app.control.inspect(destination=[self.hostname], timeout=timeout_s)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, sig: int = signal.SIGTERM) -> int:
        """Warm shutdown (SIGTERM: running tasks finish); SIGKILL its process group if stuck."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the worker's process group: the worker and its children."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_worker(command: Sequence[str], *, hostname: str, log_path: str | Path,
                 env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 pythonpath: Sequence[str] = (),
                 worker_class: type[AsyncsqlWorker] = AsyncsqlWorker,
                 **attributes: Any) -> AsyncsqlWorker:
    """Start a ``celery ... worker`` command line, its output to ``log_path``; not waited for.

    The worker imports with ``pythonpath`` and this process's own import path ahead of its
    ``PYTHONPATH``, so modules the tests import, it imports too. ``worker_class`` (an
    ``AsyncsqlWorker``) is built with the process, ``hostname``, ``log_path`` and ``attributes``.
    """
    log_path = Path(log_path)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(command), cwd=cwd, env=_environment(env, pythonpath),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return worker_class(proc, hostname, log_path, **attributes)


def worker_command(app: str, *, hostname: str, pool: str | None = "asyncsql",
                   concurrency: int | None = 2, args: Sequence[str] = ()) -> list[str]:
    """``celery -A app worker`` with our pool, ``-c``, its name, INFO logs, no gossip or mingle."""
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", hostname, "-l", "info",
               "--without-gossip", "--without-mingle"]
    if pool:
        command += ["-P", pool]
    if concurrency:
        command += ["-c", str(concurrency)]
    return command + list(args)


@contextmanager
def asyncsql_worker_process(app: str, *, concurrency: int | None = 2, args: Sequence[str] = (),
                            env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                            log_dir: str | Path | None = None, pythonpath: Sequence[str] = (),
                            ready_timeout_s: float = READY_TIMEOUT_S,
                            pool: str | None = "asyncsql", hostname: str | None = None,
                            log_path: str | Path | None = None, ready: bool = True,
                            worker_class: type[AsyncsqlWorker] = AsyncsqlWorker,
                            **attributes: Any) -> Iterator[AsyncsqlWorker]:
    """Run ``celery -A app worker -P pool -c concurrency *args`` until the block exits.

    Gossip and mingle are off (nothing to exchange with in a test); the log is
    ``log_path``, else ``log_dir/worker.log`` (a new temporary folder by default).
    Yields once the worker logs that it is ready (unless ``ready`` is false), and
    stops it with a warm shutdown at the end (SIGKILL to its group if it hangs).

    Raises:
        RuntimeError: the worker exited or was not ready within ``ready_timeout_s``.
    """
    hostname = hostname or f"asyncsql-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
    if log_path is None:
        log_path = Path(log_dir or tempfile.mkdtemp(prefix="asyncsql-worker-")) / "worker.log"
    command = worker_command(app, hostname=hostname, pool=pool, concurrency=concurrency,
                             args=args)
    worker = start_worker(command, hostname=hostname, log_path=log_path, env=env, cwd=cwd,
                          pythonpath=pythonpath, worker_class=worker_class, **attributes)
    try:
        if ready:
            worker.wait_for_log(" ready.", ready_timeout_s)
        yield worker
    finally:
        worker.stop()


def _environment(env: Mapping[str, str] | None, pythonpath: Sequence[str]) -> dict[str, str]:
    environment = {**os.environ, **(env or {})}
    installed = (sys.prefix, sys.base_prefix)
    paths = [*pythonpath, *(p for p in sys.path if p and not p.startswith(installed)),
             *environment.get("PYTHONPATH", "").split(os.pathsep)]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return environment


@pytest.fixture(scope="session")
def asyncsql_worker_app(pytestconfig: pytest.Config) -> str:
    """The ``-A`` module path of the worker: the ``asyncsql_worker_app`` ini option.

    Override this fixture (session scope) to compute it instead.
    """
    app = str(pytestconfig.getini("asyncsql_worker_app")).strip()
    if not app:
        raise pytest.UsageError(
            "The asyncsql_worker fixture needs your Celery app's module: set "
            "`asyncsql_worker_app = proj.tasks` in your pytest configuration, or define a "
            "session-scoped `asyncsql_worker_app` fixture returning it.")
    return app


@pytest.fixture(scope="session")
def asyncsql_worker_parameters(pytestconfig: pytest.Config) -> dict[str, Any]:
    """Keyword arguments of ``asyncsql_worker_process`` besides the app.

    From the ``asyncsql_worker_concurrency`` and ``asyncsql_worker_args`` ini
    options; override it (session scope) to add ``env``, ``cwd``,
    ``pythonpath`` or ``ready_timeout_s``.
    """
    concurrency = str(pytestconfig.getini("asyncsql_worker_concurrency"))
    try:
        slots = int(concurrency)
    except ValueError:
        raise pytest.UsageError(f"asyncsql_worker_concurrency = {concurrency!r}: expected a "
                                "whole number of task slots, e.g. 2.") from None
    return {"concurrency": slots,
            "args": shlex.split(str(pytestconfig.getini("asyncsql_worker_args"))),
            "cwd": pytestconfig.rootpath, "pythonpath": [str(pytestconfig.rootpath)]}


@pytest.fixture(scope="session")
def asyncsql_worker(asyncsql_worker_app: str, asyncsql_worker_parameters: dict[str, Any],
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsyncsqlWorker]:
    """A ``celery worker -P asyncsql`` subprocess for the test session, ready to take tasks."""
    parameters = {"log_dir": tmp_path_factory.mktemp("asyncsql-worker"),
                  **asyncsql_worker_parameters}
    with asyncsql_worker_process(asyncsql_worker_app, **parameters) as worker:
        yield worker
