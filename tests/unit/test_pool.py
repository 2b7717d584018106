"""The pool's guard against re-entering its own work from Celery's signal handler.

Celery's cold shutdown calls ``TaskPool.on_stop`` from a signal handler; when
that handler interrupted the supervisor mid-step, ``Supervisor.busy_here()``
says so, on the interrupted thread only.
"""

import threading

from celery_asyncpool.parent.driver import LoopDriver
from celery_asyncpool.parent.supervisor import Supervisor


class _Observed(Supervisor):
    """Records ``busy_here()`` from inside ``apply``, and can hold the step there."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        super().__init__(processes=0, slots_per_child=1, limit=1, spawn=lambda index: None,
                         driver=LoopDriver(), cancel_grace_s=1)
        self.seen: list[bool] = []
        self.inside = threading.Event()
        self.hold = hold

    def dispatch(self) -> None:  # called by apply, an entry point
        self.seen.append(self.busy_here())
        self.inside.set()
        if self.hold is not None:
            self.hold.wait(5)


def _apply(supervisor: Supervisor) -> None:
    supervisor.apply(print, ("task", "id"), {}, {})


def test_outside_the_supervisor_it_is_not_busy():
    supervisor = _Observed()
    assert not supervisor.busy_here()
    supervisor.driver.close()


def test_inside_an_entry_point_it_is_busy_and_not_after():
    supervisor = _Observed()
    _apply(supervisor)
    assert supervisor.seen == [True]
    assert not supervisor.busy_here()
    supervisor.driver.close()


def test_a_step_on_the_drivers_thread_does_not_make_another_thread_busy():
    hold = threading.Event()
    supervisor = _Observed(hold)
    driver = supervisor.driver
    driver.start_thread()
    try:
        driver.call_later(0, _apply, supervisor)
        assert supervisor.inside.wait(5)
        assert not supervisor.busy_here()  # this thread was not interrupted mid-step
    finally:
        hold.set()
        driver.stop_thread()
        driver.close()
    assert supervisor.seen == [True]
