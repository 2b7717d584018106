"""Secrets: a database password never leaves the worker, and children take input from no socket."""

import json
import os
import stat

import psutil

from tests.integration.test_check_and_config import celery

from .accounting import settle, stored
from .tasks import INCLUDE, select_one

PASSWORD = "s3cr3t-pw"  # trust auth on the test server accepts any password
URL = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:5432/test"
UNREACHABLE = f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:1/test"
CONF = {"asyncsql_databases": {
    "reports": UNREACHABLE,
    "archive": {"url": UNREACHABLE,
                "engine_options": {"connect_args": {"password": PASSWORD}}}},
    "asyncsql_engine_options": {"connect_args": {"password": PASSWORD}}}


def _inspect_everything(worker) -> dict[str, str]:
    inspect = worker.inspect(timeout=5)
    replies = {name: getattr(inspect, name)() for name in
               ("stats", "conf", "report", "registered", "active", "reserved")}
    assert replies["stats"] and replies["conf"], "the worker answered inspect"
    return {f"`inspect {name}` reply": json.dumps(reply) for name, reply in replies.items()}


def test_a_database_password_appears_in_no_log_banner_inspect_reply_or_stored_error(
        worker_factory):
    with worker_factory(concurrency=4, include=INCLUDE, conf=CONF,
                        env={"ITEST_DATABASE_URL": URL}) as worker:
        ids = [worker.send(select_one).id for _ in range(4)]
        ids += [worker.send(select_one, name).id for name in ("reports", "archive")]
        account = settle("secrets: tasks on a database with a password in its URL", ids,
                         run=None, timeout_s=60)
        replies = _inspect_everything(worker)
        worker.stop()
    check = celery("asyncsql", "check", conf={**CONF, "asyncsql_database_url": URL})
    report = celery("report", conf={**CONF, "asyncsql_database_url": URL})
    assert report.returncode == 0 and "asyncsql_databases" in report.stdout, report.stderr
    results = json.dumps(stored(ids))
    assert account.missing == [] and account.once == 4
    assert set(account.failed) == {"ConnectionRefusedError"}, account.reasons
    logs = worker.logs()
    assert "postgres:***@127.0.0.1:1/test" in logs, "the banner names the databases, masked"
    assert "postgres:***@127.0.0.1:1/test" in check.stdout + check.stderr
    for where, text in [("worker log", logs), *replies.items(), ("stored results", results),
                        ("check", check.stdout + check.stderr),
                        ("`celery report`", report.stdout + report.stderr)]:
        assert PASSWORD not in text, f"the password leaked into the {where}"


def _pipes(pid: int) -> set[str]:
    fds = f"/proc/{pid}/fd"
    return {os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)
            if stat.S_ISFIFO(os.stat(f"{fds}/{fd}").st_mode)}


def test_children_read_jobs_from_pipes_shared_with_their_parent_alone_and_listen_on_no_socket(
        worker_factory):
    with worker_factory(concurrency=4, include=INCLUDE) as worker:
        children = worker.wait_for_children(2)
        others = [p.pid for p in psutil.process_iter() if p.pid not in (worker.pid, *children)]
        other_pipes = set().union(*(_pipes(pid) for pid in others if _readable(pid)))
        for pid in (worker.pid, *children):
            listening = [c for c in psutil.Process(pid).net_connections(kind="all")
                         if c.status == psutil.CONN_LISTEN]
            assert listening == [], f"process {pid} listens on {listening}"
        parent_pipes = _pipes(worker.pid)
        for child in children:
            shared = _pipes(child) & parent_pipes
            assert len(shared) >= 2, "each child has a job pipe and a report pipe to its parent"
            assert not shared & other_pipes, "no other process holds an end of them"
        assert worker.send(select_one).get(timeout=30) == 1


def _readable(pid: int) -> bool:
    try:
        _pipes(pid)
    except OSError:
        return False
    return True
