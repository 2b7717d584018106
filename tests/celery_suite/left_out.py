"""The tests of Celery's integration suite that are not run, each with its reason.

Reviewed like code: a test is left out only if it cannot pass against this
set-up on any pool (``ANY_POOL``), or if it rests on something ``-P asyncsql``
does differently by design (``ASYNCSQL``), or on the async bodies of
``async_bodies.py`` (``ASYNC_BODIES``), with the docs section that says so. A key is a test's node id, or the start of one (a whole
module or class).
"""

from __future__ import annotations

# Not run on any pool, prefork included: not in the reference, not in the table's "failed".
ANY_POOL: dict[str, str] = {
    "t/integration/test_inspect.py::test_Inspect::test_stats":
        "Asserts the session worker's concurrency is 1 (Celery's default for it); the suite "
        "runs at -c 4 on every pool, so that several tasks run at once.",
    "t/integration/test_backend.py":
        "Azure Blob Storage only (needs the azure packages and AZUREBLOCKBLOB_URL): no such "
        "service here, and no worker involved.",
}

# Not run on -P asyncsql (any pass): the test relies on what the pool does differently by design.
ASYNCSQL: dict[str, str] = {
    "t/integration/test_tasks.py::test_tasks::test_retry":
        "Its task counts its attempts on the task object of the process that runs it "
        "(t/integration/tasks.py:281-287), so it needs every retry in the process of the first "
        "run. -P asyncsql hands each job to the child with the most free slots, so retries "
        "move between children (docs/architecture.md); Celery promises no such affinity on any "
        "pool. Seen failing in the async pass of 2026-12-07's CI run, its rerun doomed by the "
        "count the first run left behind in one child.",
}

# Not run in the async-body pass only; each reason names the docs section it rests on.
ASYNC_BODIES: dict[str, str] = {
    "t/integration/test_canvas.py::test_chain::test_chord_soft_timeout_recuperation":
        "Its body catches SoftTimeLimitExceeded inside a blocking sleep. An async body awaits "
        "that sleep on a thread, which no soft limit can interrupt, as on any thread pool: "
        "the limit is raised at the await instead (docs/getting-started.md, 'What changes "
        "from prefork').",
}


def reason(nodeid: str, pool: str, async_bodies: bool) -> str | None:
    """Why the test ``nodeid`` is left out of this pass, or None if it runs."""
    for table in (ANY_POOL, ASYNCSQL if pool == "asyncsql" else {},
                  ASYNC_BODIES if async_bodies else {}):
        for key, why in table.items():
            if nodeid == key or nodeid.startswith(key + "::") or nodeid.startswith(key + "["):
                return why
    return None
