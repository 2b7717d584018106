"""Task request identity, shared by a tracer thread and the coroutine it awaits.

Celery finds ``task.request`` and ``current_task`` on ``LocalStack``s keyed by
the current thread (or greenlet). A coroutine runs on the loop's thread, where
those stacks are empty. This module is the one place that re-keys them: by a
context variable that the bridge sets to the tracer's identity before it hands
the coroutine to the loop, falling back to the thread when it is unset.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING, Any

from celery import _state
from celery.utils.threads import get_ident

from .errors import AsyncPoolError

if TYPE_CHECKING:
    from celery import Celery

_caller: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "celery_asyncpool_caller", default=None)


def _ident() -> Any:
    caller = _caller.get()
    return get_ident() if caller is None else caller


def caller_context() -> contextvars.Context:
    """A copy of the current context in which the stacks resolve to this caller."""
    context = contextvars.copy_context()
    context.run(_caller.set, _ident())
    return context


def install(app: Celery) -> None:
    """Key Celery's task stack and every task's request stack by caller.

    Raises:
        AsyncPoolError: when this Celery's stacks no longer take an identity
            function (``celery.utils.threads.LocalStack.__ident_func__``).
    """
    stacks = [_state._task_stack]
    stacks += [task.request_stack for task in app.tasks.values()
               if task.request_stack is not None]
    for stack in stacks:
        if not hasattr(type(stack), "__ident_func__"):
            raise AsyncPoolError(
                f"{type(stack).__module__}.{type(stack).__name__} has no __ident_func__: "
                "this Celery version keys task requests differently, so async tasks "
                "cannot see self.request. Unset USE_FAST_LOCALS, or pin celery<5.8."
            )
        stack.__ident_func__ = _ident
