"""The fault-and-load suite: real workers meet kills, outages and load, and lose nothing.

Every test here is marked ``faults`` (and ``integration``). Each ends with an
account of every task it sent (``accounting.settle``); the terminal summary
(``tests/conftest.py``) prints them all as one table, with the load figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import pg_scalar, services, worker_factory

from .tasks import LEDGER

__all__ = ["services", "worker_factory"]  # the integration suite's fixtures, used here too


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def ledger() -> None:
    pg_scalar(LEDGER)
