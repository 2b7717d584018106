"""The fleet's connection budget: every asyncsql worker's, added up per database server.

Engines connect lazily, so ``pg_stat_activity`` at start-up says little of
what a fleet will hold. Each worker advertises its budget per server in
``inspect stats`` (the pool's ``asyncsql`` entry, ``BUDGET_KEY``);
``celery asyncsql check`` and a starting worker (``parent.fleet_check``) ask
every worker the app's broker reaches, add their own budget, and compare each
server's total with what it takes from roles that are not superusers:
``max_connections`` less the reserved slots.

Servers are named as each worker's URL names them (``host:port``): workers that
reach one server by different names are not added up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .budget import ServerLimit

BUDGET_KEY = "connection-budget-by-server"
INSPECT_TIMEOUT_S = 1.0

Budgets = Mapping[str, Mapping[str, int]]  # worker node -> server -> connections


def advertised(app: Any, own_node: str | None, timeout_s: float = INSPECT_TIMEOUT_S,
               connection: Any = None) -> dict[str, dict[str, int]]:
    """The budget per server of each asyncsql worker that answers ``inspect stats``
    within ``timeout_s``, ``own_node`` left out (a worker may answer its own broadcast)."""
    replies = app.control.inspect(timeout=timeout_s, connection=connection).stats() or {}
    peers: dict[str, dict[str, int]] = {}
    for node, stats in replies.items():
        pool = stats.get("pool") if isinstance(stats, dict) else None
        info = pool.get("asyncsql") if isinstance(pool, dict) else None
        budget = info.get(BUDGET_KEY) if isinstance(info, dict) else None
        if node != own_node and isinstance(budget, dict):
            peers[node] = {str(server): int(n) for server, n in budget.items()}
    return peers


def sharing(peers: Budgets, server: str) -> dict[str, int]:
    """The workers of ``peers`` whose budget counts connections to ``server``."""
    return {node: budget[server] for node, budget in peers.items() if budget.get(server)}


def totals(own: Mapping[str, int], peers: Budgets) -> dict[str, int]:
    """Each server's connections, this worker's and its peers' together."""
    servers = set(own) | {server for budget in peers.values() for server in budget}
    return {server: own.get(server, 0) + sum(sharing(peers, server).values())
            for server in sorted(servers)}


def over_limits(own_name: str, own: Mapping[str, int], peers: Budgets,
                limits: Mapping[str, ServerLimit]) -> list[str]:
    """A problem for each server the fleet's budgets together would overfill, naming each
    worker and its share. A pooled server's PostgreSQL limit is left out (its clients are
    the pooler's); PgBouncer's own limit counts even for a worker alone."""
    problems = []
    for server, total in totals(own, peers).items():
        limit = limits.get(server)
        shares = sharing(peers, server)
        if limit is None or limit.pooled or (not shares and not limit.pgbouncer) \
                or total <= limit.usable:
            continue
        named = [", ".join(f"{node} {n}" for node, n in sorted(shares.items())),
                 f"{own_name} {own.get(server, 0)}"]
        fix = ("raise PgBouncer's max_client_conn" if limit.pgbouncer
               else "put PgBouncer in front")
        problems.append(
            f"Server {server}: the fleet may open {total} connections "
            f"({'; '.join(part for part in named if part)}), above the {limit.describe()}. "
            f"Lower -c or asyncsql_connection_cap across the fleet, or {fix} "
            "(docs/sizing.md, 'A fleet').")
    return problems
