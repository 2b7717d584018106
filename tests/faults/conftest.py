"""The fault-and-load suite: real workers meet kills, outages and load, and lose nothing.

Every test here is marked ``faults`` (and ``integration``). Each ends with an
account of every task it sent (``accounting.settle``); the terminal summary
prints them all as one table, with the load figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import pg_scalar
from tests.integration.conftest import services, worker_factory

from . import accounting
from .tasks import LEDGER

__all__ = ["services", "worker_factory"]  # the integration suite's fixtures, used here too


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter) -> None:
    if accounting.ACCOUNTS or accounting.FIGURES:
        terminalreporter.section("fault suite: every task accounted for")
        for line in accounting.table():
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def ledger() -> None:
    pg_scalar(LEDGER)
