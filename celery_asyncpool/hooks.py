"""Async hooks run on a child's event loop when it starts and before it stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .errors import ChildStartError

logger = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]
H = TypeVar("H", bound=Hook)  # the decorators give back the hook's own type

_start_hooks: list[Hook] = []
_stop_hooks: list[Hook] = []


def on_child_start(hook: H) -> H:
    """Register ``async def hook()`` to run on each child's loop after its engines exist.

    Hooks run in registration order, each bounded by ``asyncsql_hook_timeout_s``.
    A hook that fails stops the child (logged with the hook's name); the
    worker replaces it, throttled as prefork throttles failing children.
    """
    _start_hooks.append(hook)
    return hook


def on_child_stop(hook: H) -> H:
    """Register ``async def hook()`` to run on each child's loop before its engines close.

    Hooks run in reverse registration order, each bounded by
    ``asyncsql_hook_timeout_s``; one that fails is logged and the rest still run.
    """
    _stop_hooks.append(hook)
    return hook


def _name(hook: Hook) -> str:
    return f"{getattr(hook, '__module__', '?')}.{getattr(hook, '__qualname__', repr(hook))}"


async def run_start_hooks(timeout_s: float) -> None:
    """Run the start hooks in order.

    Raises:
        ChildStartError: naming the first hook that failed or timed out.
    """
    for hook in list(_start_hooks):
        try:
            await asyncio.wait_for(hook(), timeout_s)
        except Exception as exc:
            logger.error("on_child_start hook %s failed; this child exits", _name(hook),
                         exc_info=True)
            raise ChildStartError(
                f"on_child_start hook {_name(hook)} failed: {exc!r}") from exc


async def run_stop_hooks(timeout_s: float) -> None:
    """Run the stop hooks in reverse order; log each failure and go on."""
    for hook in reversed(_stop_hooks):
        try:
            await asyncio.wait_for(hook(), timeout_s)
        except Exception:
            logger.error("on_child_stop hook %s failed", _name(hook), exc_info=True)
