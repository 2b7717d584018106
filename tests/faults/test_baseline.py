"""The control row: with no fault, every task runs once and the account says so."""

import uuid

from .accounting import publish, settle
from .tasks import INCLUDE, effect


def test_without_a_fault_every_task_runs_exactly_once(worker_factory):
    run = uuid.uuid4().hex
    with worker_factory(concurrency=8, include=INCLUDE) as worker:
        ids = publish(worker, effect, 500, run)
        account = settle("none (control)", ids, run=run, timeout_s=60)
    assert account.missing == []
    assert (account.once, account.again, account.failed_total) == (500, 0, 0)
