"""Fork safety: every engine this process connects is known, and made safe in a forked child.

An engine whose pool holds connections when the process forks hands the
child the parent's sockets, its queue of them and its overflow count (the
pid-checking pool events of SQLAlchemy's "Using Connection Pools with
Multiprocessing or os.fork()" only invalidate connections at checkout, so the
queue and the count stay). ``engine.dispose(close=False)`` in the child gives
the engine a fresh, empty pool and leaves the parent's connections alone.

The engines are found by a class-level ``engine_connect`` listener, ours and
the user's own ``create_async_engine`` alike, registered before the worker
imports the task modules (``watch_engines``, from ``registration``). An engine
that never connected has an empty pool and nothing to hand over. One that the
``-A`` module itself connects while it is imported, before that, is not seen.
The listener costs each connection checkout about 2 us.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
_watching = False


def watch_engines() -> None:
    """Note every engine of this process when it connects, from now on. Imports SQLAlchemy."""
    global _watching
    if _watching:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "engine_connect", _note)
    _watching = True


def _note(connection: Connection, *_: Any) -> None:
    _engines.add(connection.engine)


def make_inherited_engines_safe() -> int:
    """In a forked child: give each engine the parent connected a fresh pool; how many.

    Run it first thing after fork, before any of those engines is used.
    """
    engines = list(_engines)
    for inherited in engines:
        inherited.dispose(close=False)
    return len(engines)
