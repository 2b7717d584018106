"""The fleet tests: worker hosts of their own (network namespaces) on one broker, one
PgBouncer and one PostgreSQL. Marked ``fleet``: ``.ci/run`` runs them as a part of their
own (``scripts/test -m fleet``), not ``scripts/test``. The terminal summary prints a table
per scenario.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import services

__all__ = ["services"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.fleet)
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter) -> None:
    from .fleet import NOTES, ROWS

    if not ROWS and not NOTES:
        return
    terminalreporter.section("fleet: every task accounted for")
    for line in ["| scenario | hosts | slots | sent | ran once | ran again | "
                 "failed with a reason | missing | peak server connections |",
                 "|---|---:|---:|---:|---:|---:|---|---:|---:|",
                 *("| " + " | ".join(row.cells()) + " |" for row in ROWS)]:
        terminalreporter.write_line(line)
    for note in NOTES:
        terminalreporter.write_line(f"- {note}")
