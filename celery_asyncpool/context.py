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

from celery.utils.threads import get_ident

from . import _compat

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
        CompatibilityError: when this Celery's stacks no longer take an identity
            function.
    """
    stacks = [_compat.task_stack()]
    stacks += [task.request_stack for task in app.tasks.values()
               if task.request_stack is not None]
    for stack in stacks:
        _compat.set_stack_identity(stack, _ident)
