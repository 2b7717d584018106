"""A SIGTERM to the worker's whole process group is a warm shutdown, as one to the worker.

systemd's default ``KillMode=control-group`` sends SIGTERM to every process of
the unit on each restart, as ``kill -- -PGID`` does. Prefork's children die of
it at once and their tasks end ``WorkerLostError``; asyncsql's children ignore
it, and the parent's warm shutdown lets their tasks finish.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.integration.conftest import ROOT, eventually

from .accounting import effects, publish, settle
from .tasks_crash import INCLUDE, marked_effect_late, starts, sync_marked_effect_late

# Not serial: it signals only its own worker's process group.


@pytest.mark.parametrize("pool", ["asyncsql", "prefork"])
def test_a_group_sigterm_lets_the_tasks_in_flight_finish(worker_factory, pool):
    """Four 3 s tasks, the group signalled 1 s in: asyncsql finishes all four and exits 0;
    prefork, the control, loses all four."""
    run = uuid.uuid4().hex
    task = marked_effect_late if pool == "asyncsql" else sync_marked_effect_late
    with worker_factory(pool=pool, concurrency=8 if pool == "asyncsql" else 4,
                        include=INCLUDE) as worker:
        ids = publish(worker, task, 4, run, 3)
        eventually(lambda: effects(starts(run)).total() >= 4, 30, "the four tasks started")
        time.sleep(1)
        os.killpg(worker.proc.pid, signal.SIGTERM)  # the worker and its children
        code = worker.proc.wait(60)
        account = settle(f"SIGTERM to the process group 1 s into 3 s tasks ({pool})", ids,
                         run=run, timeout_s=30)
    if pool == "asyncsql":
        assert code == 0 and account.once == 4 and not account.failed, account
    else:
        assert account.failed["WorkerLostError"] == 4, account  # what prefork loses


DEPLOYMENT = ROOT / "docs" / "deployment.md"


def _block(language: str) -> str:
    found = re.search(rf"```{language}\n(.*?)```", DEPLOYMENT.read_text(), re.S)
    assert found, f"docs/deployment.md has a {language} block"
    return found.group(1)


def test_the_documented_systemd_unit_stops_as_systemd_stops_it(tmp_path):
    """The unit's ExecStart, run in a process group of its own (as systemd's cgroup holds
    it), its project swapped for the tests' app; the group signalled as KillMode says."""
    unit = dict(line.split("=", 1) for line in _block("ini").splitlines()
                if "=" in line and not line.startswith("#"))
    assert (unit["KillMode"], unit["KillSignal"]) == ("control-group", "SIGTERM")
    command = shlex.split(unit["ExecStart"])
    assert command[0].endswith("/celery") and command[1:3] == ["-A", "proj"]
    queue = f"itest-{uuid.uuid4().hex[:10]}"
    run = uuid.uuid4().hex
    log = tmp_path / "unit.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ITEST_QUEUE": queue, "ITEST_APP_NAME": queue,
           "ITEST_INCLUDE": INCLUDE, "ITEST_CONF": "{}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tests.integration.app",
                                 *command[3:], "-n", f"{queue}@%h"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        eventually(lambda: " ready." in log.read_text(), 60, "the unit's worker ready")
        ids = [marked_effect_late.apply_async((run, 3), queue=queue).id for _ in range(4)]
        eventually(lambda: effects(starts(run)).total() >= 4, 30, "the four tasks started")
        time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(int(unit["TimeoutStopSec"]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    account = settle("the documented systemd unit, restarted mid-task", ids, run=run)
    assert code == 0 and account.once == 4 and not account.failed, log.read_text()[-3000:]


def test_the_documented_pod_runs_the_worker_as_its_first_process_with_time_to_stop():
    pod = _block("yaml")
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", pod).group(1))
    stop = int(re.search(r"TimeoutStopSec=(\d+)", _block("ini")).group(1))
    assert grace > stop, "the pod waits at least as long as the unit for tasks to finish"
    command = re.search(r"command: (\[.*?\])", pod, re.S).group(1)
    assert json.loads(command)[:5] == ["celery", "-A", "proj", "worker", "-P"], \
        "celery itself is the first process (a shell would not pass SIGTERM on)"
