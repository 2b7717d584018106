"""Run kombu's own Redis transport unit tests against ``celery_asyncpool.broker``.

With ``KOMBU_SUITE_TRANSPORT=ours`` the names the tests reach through
``kombu.transport.redis`` (``Transport``, ``Channel``, ``QoS``, and the Sentinel
pair) are the package's subclasses, so every ``redis.Channel(...)`` the tests
build, and every test class that subclasses one, is ours.
"""

from __future__ import annotations

import json
import os

import pytest

if os.environ.get("KOMBU_SUITE_TRANSPORT") == "ours":
    from kombu.transport import redis

    from celery_asyncpool import broker

    redis.Transport = broker.Transport
    redis.Channel = broker.Channel
    redis.QoS = broker.BatchQoS
    redis.SentinelChannel = broker.SentinelChannel
    redis.SentinelTransport = broker.SentinelTransport

_outcomes: dict[str, str] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped:
        _outcomes.setdefault(report.nodeid, "skipped")
    elif report.when == "call":
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = os.environ.get("KOMBU_SUITE_RESULTS")
    if path:
        with open(path, "w") as handle:
            json.dump(_outcomes, handle, indent=1)
