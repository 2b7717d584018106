"""The pytest plugin: loaded by entry point, and clear when it cannot start a worker."""

import subprocess
import sys

import pytest

from celery_asyncpool.pytest_plugin import asyncsql_worker_process


def run_pytest(folder, *args):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=folder, capture_output=True, text=True, timeout=120)


def test_the_plugin_is_loaded_by_its_entry_point(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    done = run_pytest(tmp_path, "--fixtures")
    assert "asyncsql_worker [session scope]" in done.stdout, done.stdout + done.stderr


def test_a_worker_without_an_app_says_how_to_name_it(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_it.py").write_text("def test_it(asyncsql_worker):\n    pass\n")
    done = run_pytest(tmp_path, "-q")
    assert done.returncode != 0
    assert "set `asyncsql_worker_app = proj.tasks` in your pytest configuration" in (
        done.stdout + done.stderr)


def test_a_worker_that_cannot_start_fails_with_its_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)exited with .*before logging ' ready.'.*"
                                           r"no_such_tasks_module"):
        with asyncsql_worker_process("no_such_tasks_module", log_dir=tmp_path):
            pass
