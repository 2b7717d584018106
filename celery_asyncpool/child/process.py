"""The child process: its entry point, set-up after fork, the job server's run, tear-down.

``child_entry`` is the ``Process`` target the parent (``parent.pool``) starts.
Set-up order matters: engines inherited over fork are made safe first, then
the loop exists before Celery's ``process_initializer`` runs user code that
may bind to it, then the bridges go in, then the engines and start hooks.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import _compat, offload
from ..config import Settings
from ..databases.engines import Sizing, forget_inherited_loops
from ..databases.fork import make_inherited_engines_safe
from ..errors import ChildStartError
from ..wire import BYE, UP, PipeEnd
from . import celery_io, leftovers
from .bridge import install_bridges
from .runtime import Runtime
from .server import JobServer, ReportPipe

if TYPE_CHECKING:
    from celery import Celery

RESTART_DELAY_S = 1.0  # the parent replaces a failed child at once: no hot restart loop
START_FAILED_EXITCODE = 3


def child_entry(parent_fds: list[int], app: Any, hostname: str, slots: int, processes: int,
                job: PipeEnd, report: PipeEnd, max_tasks: int | None,
                max_memory_kb: int | None) -> None:
    """The child process: drop the parent's ends of every pipe, then serve jobs."""
    for fd in parent_fds:
        os.close(fd)
    child_main(app, hostname, slots, processes, job.fd, report.fd, max_tasks, max_memory_kb)


def ignore_group_sigterm() -> None:
    """Ignore SIGTERM, unless a ``worker_process_init`` handler installed its own.

    The parent never stops a child with SIGTERM (it asks over the pipe, and
    kills with SIGKILL). A SIGTERM here comes from outside, usually to the
    whole process group: systemd's ``KillMode=control-group`` on every restart,
    ``kill -- -PGID``. The parent gets it too and shuts down warm, so the
    child's tasks in flight must finish, not die with it.
    """
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def child_main(app: Celery, hostname: str, slots: int, processes: int, job_fd: int,
               report_fd: int, max_tasks: int | None, max_memory_kb: int | None) -> None:
    """Set up this freshly forked child, serve jobs until told to stop, tear down, say BYE.

    Returns once BYE is sent; the caller then exits the process (with 0).

    Raises:
        SystemExit: ``START_FAILED_EXITCODE``, ``RESTART_DELAY_S`` after an
            ``on_child_start`` hook failed; no UP was sent.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the handler inherited is the parent's
    make_inherited_engines_safe()
    forget_inherited_loops()
    settings = Settings.from_conf(app.conf)
    if settings.switch_interval_s is not None:
        # Before worker_process_init, whose handlers may set their own.
        sys.setswitchinterval(settings.switch_interval_s)
    runtime = Runtime(settings, Sizing(slots, processes, settings.connection_cap),
                      own_thread=False, worker=hostname)
    _compat.process_initializer(app, hostname)  # resets SIGTERM to its default
    ignore_group_sigterm()
    async_tasks = install_bridges(app, runtime, hostname)
    if settings.results_off_loop:
        runtime.closers.append(celery_io.install(app).aclose)
    try:
        runtime.open()
    except ChildStartError:
        runtime.stop(run_hooks=False)
        time.sleep(RESTART_DELAY_S)
        raise SystemExit(START_FAILED_EXITCODE) from None
    leftovers.install_task_factory(runtime.loop)  # on top of one a start hook set
    reports = ReportPipe(report_fd)
    reports.send((UP, os.getpid()))
    server = JobServer(runtime, async_tasks, slots, job_fd, reports,
                       max_tasks=max_tasks, max_memory_kb=max_memory_kb)
    try:
        runtime.loop.run_until_complete(server.serve())
    finally:
        runtime.stop()
        offload.shutdown()
        _compat.process_destructor(os.getpid(), 0)
    reports.send((BYE,))
