"""The pool's guard against re-entering its own work from Celery's signal handler."""

import sys

from celery_asyncpool.driver import LoopDriver
from celery_asyncpool.pool import runs_over_our_code


def test_a_call_from_outside_the_package_does_not_run_over_our_code():
    assert not runs_over_our_code(sys._getframe())


def test_a_call_made_while_the_supervisors_loop_runs_a_callback_does():
    # As when Celery's cold-shutdown handler interrupts a supervisor callback.
    seen = []
    driver = LoopDriver()
    try:
        driver.call_later(0, lambda: seen.append(runs_over_our_code(sys._getframe())))
        assert driver.run_until(lambda: bool(seen), timeout_s=5)
    finally:
        driver.close()
    assert seen == [True]
