"""Celery's own integration suite (``t/integration`` of its sdist) on ``-P asyncsql``.

Loaded with ``-p tests.celery_suite.plugin`` by ``scripts/celery-suite``, after
``celery.contrib.pytest``. The suite's session worker runs in the test process
(``celery.contrib.testing.worker.start_worker``); this plugin only changes its
fixtures, never its tests:

- ``celery_worker_pool``: the pool named by ``CELERY_SUITE_POOL`` (``asyncsql``,
  or ``prefork`` to record the reference);
- ``celery_worker_parameters``: ``CELERY_SUITE_CONCURRENCY`` slots (4);
- ``celery_includes``: with ``CELERY_SUITE_BODIES=async``, also
  ``tests.celery_suite.async_bodies``, which turns each of the suite's tasks
  into an ``AsyncTask`` whose ``async def`` body runs the original.

The suite's conftest defines the first and last of these itself, and a
conftest's fixture wins over a plugin's, so the plugin swaps the conftest
module's functions for its own as pytest registers the module, before pytest
reads its fixtures. Tests listed in ``left_out.py`` are deselected, with the
reason written there.
"""

from __future__ import annotations

import json
import os
from types import ModuleType
from typing import Any

import pytest

from tests.celery_suite import left_out

POOL = os.environ.get("CELERY_SUITE_POOL", "asyncsql")
CONCURRENCY = int(os.environ.get("CELERY_SUITE_CONCURRENCY", "4"))
ASYNC_BODIES = os.environ.get("CELERY_SUITE_BODIES", "sync") == "async"
# The broker transport of the transport pass (celery_asyncpool.broker:Transport), or kombu's.
TRANSPORT = os.environ.get("CELERY_SUITE_TRANSPORT", "")
SUITE_CONFTEST = "t.integration.conftest"


class _Results:
    """Each test's final outcome, after the rerun the flaky-test rule allows."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.reruns = 0
        self.left_out: list[str] = []

    def add(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid
        if report.outcome == "rerun":  # pytest-rerunfailures: this attempt is replaced
            self.reruns += 1
            self.outcomes.pop(nodeid, None)
            return
        current = self.outcomes.get(nodeid)
        if report.failed:
            self.outcomes[nodeid] = "failed"
        elif current == "failed":
            return  # a failed subtest or teardown keeps the test failed
        elif report.skipped:
            self.outcomes[nodeid] = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.when == "call" and current is None:
            self.outcomes[nodeid] = "xpassed" if hasattr(report, "wasxfail") else "passed"

    def write(self, path: str) -> None:
        left_out = sorted(set(self.left_out))
        with open(path, "w") as handle:
            json.dump({"outcomes": self.outcomes, "reruns": self.reruns,
                       "left_out": len(left_out), "left_out_ids": left_out}, handle, indent=1)


_results = _Results()


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    return POOL


@pytest.fixture(scope="session")
def celery_includes() -> set[str]:
    includes = {"t.integration.tasks"}
    if ASYNC_BODIES:
        includes.add("tests.celery_suite.async_bodies")
    return includes


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {"concurrency": CONCURRENCY, "shutdown_timeout": 30.0}


_CONFTEST_OVERRIDES = {"celery_worker_pool": celery_worker_pool,
                       "celery_includes": celery_includes}


def _with_transport(suite_config: Any) -> Any:
    """The suite's ``celery_config`` fixture, with ``broker_transport = TRANSPORT``."""
    original = getattr(suite_config, "__wrapped__", None)
    if original is None:
        raise pytest.UsageError(
            f"Celery's {SUITE_CONFTEST}.celery_config is no longer a fixture whose function "
            "this plugin can call: check tests/celery_suite/plugin.py against the new sdist.")

    @pytest.fixture(scope="session")
    def celery_config(request: pytest.FixtureRequest) -> dict[str, Any]:
        config: dict[str, Any] = original(request)
        config["broker_transport"] = TRANSPORT
        return config

    return celery_config


@pytest.hookimpl(tryfirst=True)
def pytest_plugin_registered(plugin: object) -> None:
    if isinstance(plugin, ModuleType) and plugin.__name__ == SUITE_CONFTEST:
        overrides = dict(_CONFTEST_OVERRIDES)
        if TRANSPORT:
            overrides["celery_config"] = _with_transport(getattr(plugin, "celery_config", None))
        for name, fixture in overrides.items():
            if not hasattr(plugin, name):
                raise pytest.UsageError(
                    f"Celery's {SUITE_CONFTEST} no longer defines the fixture {name!r} this "
                    "plugin overrides: check tests/celery_suite/plugin.py against the new sdist.")
            setattr(plugin, name, fixture)


def pytest_ignore_collect(collection_path: Any, config: pytest.Config) -> bool | None:
    """Whole modules left out are not even imported (they may need packages not installed)."""
    relative = os.path.relpath(collection_path, config.rootpath)
    if left_out.reason(relative, POOL, ASYNC_BODIES):
        _results.left_out.append(relative)
        return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        (dropped if left_out.reason(item.nodeid, POOL, ASYNC_BODIES) else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    _results.left_out += [item.nodeid for item in dropped]
    _expect_prefork_failures(items)


def _expect_prefork_failures(items: list[pytest.Item]) -> None:
    """A test that did not pass on prefork (not in ``CELERY_SUITE_REFERENCE``, which
    ``run.py`` gives on -P asyncsql) is an expected failure here: the pool is held to
    prefork's results, not to tests that fail in this environment on any pool."""
    reference = os.environ.get("CELERY_SUITE_REFERENCE")
    if not reference:
        return
    with open(reference) as handle:
        passed_on_prefork = set(handle.read().splitlines())
    marker = pytest.mark.xfail(reason=f"did not pass on prefork either ({reference})",
                               strict=False)
    for item in items:
        if item.nodeid not in passed_on_prefork:
            item.add_marker(marker)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _results.add(report)


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("CELERY_SUITE_RESULTS")
    if path:
        _results.write(path)


def pytest_report_header() -> str:
    bodies = "async bodies (AsyncTask)" if ASYNC_BODIES else "the suite's own sync bodies"
    return (f"celery-suite: -P {POOL} -c {CONCURRENCY}, {bodies}, "
            f"broker {os.environ.get('TEST_BROKER')}, backend {os.environ.get('TEST_BACKEND')}")
