"""Start a ``-P asyncsql`` worker for an example, wait until it is ready, stop it by its PID."""

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def asyncsql_worker(folder: Path, app_module: str, var: Path,
                    concurrency: int = 2) -> Iterator[subprocess.Popen]:
    """``celery -A app_module worker -P asyncsql`` run in ``folder``; warm shutdown on exit.

    ``var`` gets the filesystem broker's and result backend's folders and the worker's log.
    """
    for name in ("broker", "control", "results"):
        (var / name).mkdir(parents=True, exist_ok=True)
    log_path = var / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", app_module, "worker", "-P", "asyncsql",
               "-c", str(concurrency), "-l", "info", "--without-gossip", "--without-mingle"]
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_ready(worker, log_path)
        yield worker
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown: running tasks finish
        worker.wait(60)


def _wait_until_ready(worker: subprocess.Popen, log_path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while " ready." not in log_path.read_text(errors="replace"):
        if worker.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the worker did not start; its log:\n{log_path.read_text()}")
        time.sleep(0.2)
