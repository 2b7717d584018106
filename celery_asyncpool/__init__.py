"""A Celery worker pool for native ``async def`` tasks on SQLAlchemy asyncio.

``celery -A proj worker -P asyncsql``: each child process keeps one event loop
and builds its engines after fork, on that loop.
"""

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it

from .awaiting import aget as aget
from .databases.api import engine as engine
from .databases.api import session as session
from .errors import AsyncPoolError as AsyncPoolError
from .errors import BridgeError as BridgeError
from .errors import ConfigurationError as ConfigurationError
from .errors import NoRuntimeError as NoRuntimeError
from .hooks import on_child_start as on_child_start
from .hooks import on_child_stop as on_child_stop
from .on_commit import send_on_commit as send_on_commit
from .parent.pool import TaskPool as TaskPool
from .publish import aapply_async as aapply_async
from .registration import register as _register
from .databases.standalone import bind as bind
from .databases.standalone import open_databases as open_databases
from .task import AsyncTask as AsyncTask

__all__ = (
    "AsyncPoolError",
    "AsyncTask",
    "BridgeError",
    "ConfigurationError",
    "NoRuntimeError",
    "TaskPool",
    "aapply_async",
    "aget",
    "bind",
    "engine",
    "on_child_start",
    "on_child_stop",
    "open_databases",
    "send_on_commit",
    "session",
)

_register()
