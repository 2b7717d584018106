"""The pool's public path, ``worker_pool = "celery_asyncpool.pool:TaskPool"``: kept as it was."""

from .parent.pool import TaskPool as TaskPool

__all__ = ("TaskPool",)
