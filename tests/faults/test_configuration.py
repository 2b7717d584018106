"""Bad configuration fails a real worker at start-up, naming the key, the value and the fix."""

import json
import uuid
from pathlib import Path

import pytest

from celery_asyncpool.config import OPTIONS
from celery_asyncpool.pytest_plugin import AsyncsqlWorker, start_worker, worker_command
from tests.integration import tasks
from tests.integration.conftest import ROOT

pytestmark = pytest.mark.serial  # it starts a dozen workers at once

WRONG = {  # one wrong type or range for every setting; a new setting must be added here
    "asyncsql_processes": 0,
    "asyncsql_database_url": 5,
    "asyncsql_engine_options": ["pool_size"],
    "asyncsql_session_options": "expire_on_commit=False",
    "asyncsql_databases": ["reports"],
    "asyncsql_pgbouncer": "transaction",
    "asyncsql_dead_host_timeout_s": 1.5,
    "asyncsql_fleet_check_s": 0,
    "asyncsql_connection_cap": 0,
    "asyncsql_metrics_port": 70000,
    "asyncsql_hook_timeout_s": 0,
    "asyncsql_cancel_grace_s": -1,
    "asyncsql_loop_block_warning_s": "1",
    "asyncsql_switch_interval_s": 0,
    "asyncsql_loop": "trio",
    "asyncsql_results_off_loop": "yes",
}
EXPECTED = {option.key: option.expected for option in OPTIONS}
OTHER_MISTAKES = [
    ({"asyncsql_proceses": 2}, "Unknown setting 'asyncsql_proceses' (value 2). Did you mean "
                               "'asyncsql_processes'?"),
    ({"asyncsql_engine_options": {"pool_sise": 3}}, "rejected by create_async_engine"),
    ({"asyncsql_database_url": "postgresql+psycopg2://u:pw@h/db"},
     "driver 'psycopg2' is not async"),
]


def _start_worker(conf: dict, log_path: Path) -> AsyncsqlWorker:
    command = worker_command("tests.integration.app", hostname=f"bad-{uuid.uuid4().hex[:8]}@%h",
                             args=["-Q", "itest-never-used"])
    return start_worker(command, hostname="", log_path=log_path, cwd=ROOT,
                        env={"ITEST_CONF": json.dumps(conf)}, pythonpath=[str(ROOT)])


def test_every_setting_given_a_wrong_value_fails_the_worker_at_start_up_naming_it(tmp_path):
    assert set(WRONG) == set(EXPECTED), "every asyncsql_* setting has a wrong value here"
    cases = [({key: value}, f"Setting {key} has value {value!r}; expected {EXPECTED[key]}")
             for key, value in WRONG.items()] + OTHER_MISTAKES
    started = [(conf, message, _start_worker(conf, tmp_path / f"{n}.log"))
               for n, (conf, message) in enumerate(cases)]  # at once
    for conf, message, worker in started:
        worker.proc.wait(timeout=120)
        out = worker.logs()
        assert worker.proc.returncode != 0, f"a worker with {conf} started"
        assert message in out, f"{conf}: no {message!r} in:\n{out[-3000:]}"
        assert "Traceback" not in out, f"{conf}: a clear message, not a traceback:\n{out}"
        assert "pw@" not in out


@pytest.mark.parametrize("how, message", [
    ("setting", "Setting worker_concurrency (-c) has value -1; expected a whole number of task "
                "slots >= 1"),
    ("option", "Invalid value for '-c' / '--concurrency'"),  # Celery's own check
])
def test_a_negative_concurrency_fails_the_worker_at_start_up_naming_it(tmp_path, how, message):
    conf, args = ({"worker_concurrency": -1}, []) if how == "setting" else ({}, ["-c", "-1"])
    command = worker_command("tests.integration.app", hostname=f"bad-{uuid.uuid4().hex[:8]}@%h",
                             concurrency=None, args=["-Q", "itest-never-used", *args])
    worker = start_worker(command, hostname="", log_path=tmp_path / "worker.log", cwd=ROOT,
                          env={"ITEST_CONF": json.dumps(conf)}, pythonpath=[str(ROOT)])
    worker.proc.wait(timeout=120)
    out = worker.logs()
    assert worker.proc.returncode != 0, f"a worker with {how} -1 started:\n{out[-3000:]}"
    assert message in out, out[-3000:]
    assert "Traceback" not in out, out


def test_a_worker_warns_at_start_up_when_its_budget_exceeds_max_connections(worker_factory):
    conf = {"asyncsql_engine_options": {"pool_size": 1000}}
    with worker_factory(concurrency=2, conf=conf) as worker:
        worker.wait_for_log("asyncsql pool at start-up: Database 'default': the worker may open "
                            "2000 connections, above the server's max_connections")
        assert worker.send(tasks.async_add, 1, 2).get(timeout=30) == 3
