"""One Celery app module per way of writing the tasks; every module names its tasks alike.

Each registers ``bench.tiny``, ``bench.orm``, ``bench.io`` and ``bench.noop``,
so the runner publishes by name and any scenario's worker can take them.
"""

from __future__ import annotations

from celery import Celery

from ..settings import BACKEND_URL, BROKER_TRANSPORT, BROKER_URL


def make_app(name: str) -> Celery:
    app = Celery(name, broker=BROKER_URL, backend=BACKEND_URL)
    app.conf.broker_connection_retry_on_startup = True
    app.conf.worker_hijack_root_logger = False
    if BROKER_TRANSPORT:
        app.conf.broker_transport = BROKER_TRANSPORT
    return app
