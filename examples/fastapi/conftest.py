"""Serve the web app with uvicorn, a subprocess like the worker, for the test session."""

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tasks import VAR

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def web() -> Iterator[httpx.Client]:
    """``uvicorn web:app`` on a free port; stopped by its PID (SIGTERM: lifespan shutdown).

    Its log is ``var/uvicorn.log``.
    """
    web_log = VAR / "uvicorn.log"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open(web_log, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "web:app", "--port", str(port)],
            cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(web_log, "Application startup complete", server)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def _wait_for(log: Path, text: str, server: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"uvicorn did not log {text!r}; its log:\n{log.read_text()}")
        time.sleep(0.1)
