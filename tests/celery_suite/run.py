"""Run Celery's own integration suite on ``-P asyncsql`` and hold it to prefork's results.

``scripts/celery-suite`` calls this. For the Celery version installed (the one
the project pins), it fetches that version's sdist, checks it against the hash
in ``sdists.txt``, unpacks its ``t/`` and runs ``t/integration`` with the
suite's own in-process session worker, its fixtures changed by ``plugin.py``.
Each pass gets a Redis server of its own (the suite keeps fixed keys in
database 0 and asserts on the server's pub/sub channels) and, for the
RabbitMQ pass, a RabbitMQ virtual host of its own, so passes can run at once.

Passes (``--pass``, several at once with ``--pass all``):

- ``sync``: the suite's own tasks, Redis broker and backend;
- ``async``: the same tasks as ``AsyncTask``\\ s (``async_bodies.py``);
- ``rabbitmq``: the suite's own tasks, RabbitMQ broker, Redis backend;
- ``transport``: as ``sync``, on the package's Redis broker transport
  (``celery_asyncpool.broker:Transport``) instead of kombu's.

Every test that passed on prefork (``reference/<version>/<pass>.txt``) must pass,
but for those ``left_out.py`` leaves out, with one rerun for a failed test on
every pool (``--reruns 1``). ``--pool prefork --record`` writes the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import celery

from tests import sdist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".cache" / "celery-suite"
PASSES = ("sync", "async", "rabbitmq", "transport")
OUR_TRANSPORT = "celery_asyncpool.broker:Transport"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672"
RERUNS = 1  # the flaky-test rule, the same for every pool


def fetch_suite(version: str) -> Path:
    """Celery ``version``'s ``t/`` and ``pyproject.toml``, unpacked from its checked sdist."""
    return sdist.fetch(
        "celery", version, CACHE, HERE / "sdists.txt", ("t/", "pyproject.toml"),
        unpinned=f"celery-suite: Celery {version} is installed, but "
        "tests/celery_suite/sdists.txt has no sha256 for its sdist. Add the line "
        f"'{version} <sha256>' (pip download --no-deps --no-binary :all: celery=={version}; "
        "sha256sum the file) and record the prefork references for it (see "
        "docs/compatibility.md).")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exit(message: str) -> NoReturn:
    sys.exit(f"celery-suite: {message}")


@contextlib.contextmanager
def server(command: list[str], port: int, what: str,
           fail: Callable[[str], NoReturn] = _exit,
           address: str = "127.0.0.1") -> Iterator[None]:
    """Run ``command`` until the block ends, once ``port`` answers.

    Used here and by our own tests; ``fail`` reports a server that cannot start
    (exit here, ``pytest.fail`` in a test). The server leads a process group of its
    own, stopped as a whole: a forking server (socat's ``fork``) leaves no child behind.
    """
    try:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    except FileNotFoundError:
        fail(f"{command[0]} is not on PATH: a {what} of the caller's own is started here")
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((address, port)):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                fail(f"{what} did not start on port {port}")
            time.sleep(0.05)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)


@contextlib.contextmanager
def redis_server(fail: Callable[[str], NoReturn] = _exit,
                 bind: tuple[str, ...] = ()) -> Iterator[int]:
    """A Redis server of the caller's own on a free port, on 127.0.0.1 and ``bind``."""
    port = free_port()
    # A test host reaches it on its link's address, where protected mode would refuse it.
    exposed = ["--protected-mode", "no"] if bind else []
    with server(["redis-server", "--port", str(port), "--bind", "127.0.0.1", *bind, *exposed,
                 "--save", "", "--appendonly", "no"], port, "redis-server", fail):
        yield port


@contextlib.contextmanager
def rabbitmq_vhost(name: str) -> Iterator[str]:
    """A RabbitMQ virtual host of this pass's own, deleted afterwards."""
    def ctl(*args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    try:
        with contextlib.suppress(subprocess.CalledProcessError):
            ctl("delete_vhost", name)
        ctl("add_vhost", name)
        ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(f"celery-suite: RabbitMQ at 127.0.0.1:5672 (rabbitmqctl) is unreachable: {exc}")
    try:
        yield f"{RABBITMQ}/{name}"
    finally:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            ctl("delete_vhost", name)


def start_pass(name: str, pool: str, tree: Path, stack: contextlib.ExitStack,
               pytest_args: list[str]) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """Start one pass's pytest; returns it, its results file and its log."""
    # On -P asyncsql a test that did not pass on prefork runs as an expected failure.
    reference = reference_path(celery.__version__, name) if pool != "prefork" else Path("/-")
    port = stack.enter_context(redis_server())
    broker = f"redis://127.0.0.1:{port}/1"
    if name == "rabbitmq":
        broker = stack.enter_context(rabbitmq_vhost(f"celery-suite-{pool}-{os.getpid()}"))
    out = CACHE / "results"
    out.mkdir(parents=True, exist_ok=True)
    results, log = out / f"{name}-{pool}.json", out / f"{name}-{pool}.log"
    env = {**os.environ, "TEST_BROKER": broker, "TEST_BACKEND": f"redis://127.0.0.1:{port}/2",
           "REDIS_HOST": "127.0.0.1", "REDIS_PORT": str(port),
           "CELERY_SUITE_POOL": pool, "CELERY_SUITE_BODIES": "async" if name == "async" else "sync",
           "CELERY_SUITE_RESULTS": str(results),
           "CELERY_SUITE_TRANSPORT": OUR_TRANSPORT if name == "transport" else "",
           "CELERY_SUITE_REFERENCE": str(reference) if reference.exists() else "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(tree)]),
           # Some tests start `celery` itself: this environment's.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    paths = [] if any(arg.startswith("t/") for arg in pytest_args) else ["t/integration"]
    command = [sys.executable, "-m", "pytest", *paths, "-p", "celery.contrib.pytest",
               "-p", "tests.celery_suite.plugin", "-p", "no:cacheprovider", "-q", "-rfE",
               "--durations=15",
               f"--reruns={RERUNS}", *pytest_args]
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=handle,
                                   stderr=subprocess.STDOUT)
    return process, results, log


def reference_path(version: str, name: str) -> Path:
    # The async pass runs the same tests, on prefork with their own (sync) bodies; the
    # transport pass is held to them on kombu's transport.
    held_to = "sync" if name in ("async", "transport") else name
    return HERE / "reference" / version / f"{held_to}.txt"


def judge(version: str, name: str, pool: str, results: Path, record: bool) -> tuple[str, bool]:
    """One row of the table for this pass and pool, and whether it holds to the reference."""
    found = json.loads(results.read_text())
    outcomes: dict[str, str] = found["outcomes"]
    passed = sorted(n for n, outcome in outcomes.items() if outcome == "passed")
    failed = sorted(n for n, outcome in outcomes.items() if outcome == "failed")
    others = len(outcomes) - len(passed) - len(failed)
    row = (f"| {name} | {pool} | {len(outcomes)} | {len(passed)} | {len(failed)} | {others} | "
           f"{found['left_out']} | {found['reruns']} |")
    if record and name in ("async", "transport"):
        return row, True  # held to the sync pass's reference: nothing of their own
    if record:
        path = reference_path(version, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{n}\n" for n in passed))
        print(f"celery-suite: recorded {len(passed)} passing tests in {path.relative_to(ROOT)}")
        return row, True
    if pool == "prefork":
        return row, True
    reference = reference_path(version, name)
    if not reference.exists():
        print(f"celery-suite: no prefork reference {reference.relative_to(ROOT)}; record it "
              f"with: scripts/celery-suite --pool prefork --pass {name} --record")
        return row, False
    left_out = set(found["left_out_ids"])
    missing = [n for n in reference.read_text().splitlines()
               if outcomes.get(n) != "passed" and n not in left_out]
    for nodeid in missing:
        print(f"celery-suite: {name} pass on -P {pool}: passed on prefork, "
              f"{outcomes.get(nodeid, 'not run')} here: {nodeid}")
    return row, not missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pass", dest="passes", choices=[*PASSES, "all"], action="append")
    parser.add_argument("--pool", default="asyncsql", choices=["asyncsql", "prefork"])
    parser.add_argument("--record", action="store_true",
                        help="write the prefork reference of each pass (with --pool prefork)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args()
    if args.record and args.pool != "prefork":
        parser.error("--record writes the prefork reference: use it with --pool prefork")
    chosen = args.passes or ["all"]
    passes = [p for p in PASSES if p in chosen or "all" in chosen]
    for tool in ("redis-server", "rabbitmqctl"):
        if shutil.which(tool) is None and (tool == "redis-server" or "rabbitmq" in passes):
            sys.exit(f"celery-suite: {tool} is not on PATH; Celery's suite needs it.")
    version = celery.__version__
    tree = fetch_suite(version)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        running = {name: start_pass(name, args.pool, tree, stack, args.pytest_args)
                   for name in passes}
        for name, (process, _, log) in running.items():
            process.wait()
            print(f"=== celery-suite: {name} pass on -P {args.pool}: exit status "
                  f"{process.returncode} after {time.monotonic() - started:.0f} s; log {log}")
            print("".join(log.read_text(errors="replace").splitlines(True)[-15:]))
    print("| pass | pool | selected | passed | failed | skipped, xfail | left out | reruns |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for name, (_, results, _) in running.items():
        if not results.exists():
            print(f"celery-suite: the {name} pass wrote no results ({results})")
            ok = False
            continue
        row, held = judge(version, name, args.pool, results, args.record)
        print(row)
        ok &= held
    ok &= all((results.exists() and json.loads(results.read_text())["outcomes"])
              for _, results, _ in running.values())  # a pass that ran nothing fails
    print(f"=== celery-suite: {'every' if ok else 'NOT every'} test that passed on prefork "
          f"passed on -P {args.pool}; {time.monotonic() - started:.0f} s in all")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
