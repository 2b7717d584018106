"""Options and plumbing for the whole suite.

- ``--soak`` opts in to the long runs marked ``soak``.
- Run two at a time (``pytest -n 2``, as ``scripts/test`` does), each xdist shard talks to
  Redis databases of its own (set here, before the integration app is imported), and tests
  marked ``serial`` (they cut services or take most of PostgreSQL's connections) are left to
  a phase of their own.
- The fault suite's accounts, made in whichever process ran the test, are printed as one table
  at the end (an xdist worker hands its rows to the controller).
"""

from __future__ import annotations

import os
import sys

import pytest

# Broker and result-backend databases per xdist shard; no shard is "master".
_SHARD_DATABASES = {"master": (14, 15), "gw0": (14, 15), "gw1": (4, 5), "gw2": (2, 3),
                    "gw3": (1, 8)}  # 1: the peers smoke run (its own CI part); 8: by hand
_broker_db, _backend_db = _SHARD_DATABASES[os.environ.get("PYTEST_XDIST_WORKER", "master")]
os.environ.setdefault("ITEST_BROKER", f"redis://127.0.0.1:6379/{_broker_db}")
os.environ.setdefault("ITEST_BACKEND", f"redis://127.0.0.1:6379/{_backend_db}")

_ROWS_FROM_SHARDS: list[list[str]] = []
_FIGURES_FROM_SHARDS: list[list[str]] = []


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true",
                     help="also run the long soak tests (marked soak); CI runs their short twins")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    kept = [item for item in items if item.get_closest_marker("soak") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


def _accounting():
    return sys.modules.get("tests.faults.accounting")


def pytest_sessionfinish(session: pytest.Session) -> None:
    output = getattr(session.config, "workeroutput", None)
    accounting = _accounting()
    if output is not None and accounting is not None:  # an xdist shard: to the controller
        output["fault_rows"] = [list(account.row()) for account in accounting.ACCOUNTS]
        output["fault_figures"] = [list(figure) for figure in accounting.FIGURES]


def pytest_testnodedown(node, error) -> None:
    output = getattr(node, "workeroutput", {})
    _ROWS_FROM_SHARDS.extend(output.get("fault_rows", []))
    _FIGURES_FROM_SHARDS.extend(output.get("fault_figures", []))


def pytest_terminal_summary(terminalreporter) -> None:
    accounting = _accounting()
    rows = [*_ROWS_FROM_SHARDS, *([] if accounting is None else
                                  [list(account.row()) for account in accounting.ACCOUNTS])]
    figures = [*_FIGURES_FROM_SHARDS, *([] if accounting is None else accounting.FIGURES)]
    if rows or figures:
        from tests.faults.accounting import table

        terminalreporter.section("fault suite: every task accounted for")
        for line in table(rows, figures):
            terminalreporter.write_line(line)
