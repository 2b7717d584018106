"""Start an example's ``-P asyncsql`` worker or ``celery beat``; wait until ready; stop by PID."""

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


@contextmanager
def celery_beat(folder: Path, app_module: str, var: Path) -> Iterator[subprocess.Popen]:
    """``celery -A app_module beat`` run in ``folder``, its schedule and log in ``var``."""
    log_path = var / "beat.log"
    command = [sys.executable, "-m", "celery", "-A", app_module, "beat", "-l", "info",
               "-s", str(var / "beat-schedule")]
    with open(log_path, "wb") as log:
        beat = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_ready(beat, log_path, needle="beat: Starting...")
        yield beat
    finally:
        beat.send_signal(signal.SIGTERM)
        beat.wait(60)


def _wait_until_ready(process: subprocess.Popen, log_path: Path, needle: str = " ready.",
                      timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"{log_path.stem} did not start; its log:\n{log_path.read_text()}")
        time.sleep(0.2)
