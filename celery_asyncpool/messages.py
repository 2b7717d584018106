"""A task message the worker cannot handle is logged, rejected, and the worker serves on.

Celery's consumer passes every task message to one handler. An exception out
of it (a body that is not ``(args, kwargs, embed)``, ``headers`` of the wrong
types, an ``args`` that is not a list...) reaches the worker, which stops with
"Unrecoverable error"; a supervisor that restarts it meets the same message
again, so one bad producer stops a fleet. ``guard`` wraps the handler: such a
message is logged once with its queue and an excerpt, rejected without requeue
(never redelivered), and the next message is served. A lost broker connection
still propagates: the consumer reconnects on it.

What happens before the handler (an envelope that is not JSON, without
``properties``, a body that is not base64) is the transport's: the package's
Redis transport moves such a payload to a dead-letter list
(``celery_asyncpool.broker``); on kombu's own transport it still stops the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import _compat

logger = logging.getLogger(__name__)

EXCERPT_CHARS = 200


def guard(consumer: Any) -> None:
    """Make ``consumer``'s task handler reject, not raise, what it cannot handle."""
    _compat.wrap_task_handler(consumer, lambda handler: _guarded(consumer, handler))


def _guarded(consumer: Any, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    lost = tuple(consumer.connection_errors) + tuple(consumer.channel_errors)

    def on_task_received(message: Any) -> Any:
        try:
            return handler(message)
        except lost:
            raise
        except Exception as exc:  # noqa: BLE001 - anything else would stop the worker
            reject(message, exc, lost)
            return None

    return on_task_received


def reject(message: Any, exc: BaseException, lost: tuple[type[BaseException], ...]) -> None:
    """Log ``message`` once, with its queue and an excerpt, and reject it without requeue."""
    info = getattr(message, "delivery_info", None) or {}
    queue = info.get("routing_key") or info.get("exchange") or "?"
    logger.error("A message in queue %r is not a task this worker can run (%s: %s); rejected, "
                 "not requeued. Its headers: %s; its body: %s", queue, type(exc).__name__, exc,
                 excerpt(getattr(message, "headers", None)), excerpt(getattr(message, "body", b"")))
    _compat.forget_requests_of(message)
    if not getattr(message, "acknowledged", False):
        message.reject_log_error(logger, lost, requeue=False)


def excerpt(value: object) -> str:
    """``repr(value)``, cut to ``EXCERPT_CHARS`` characters."""
    text = repr(value)
    if len(text) <= EXCERPT_CHARS:
        return text
    return f"{text[:EXCERPT_CHARS]}... ({len(text)} characters)"
