"""Run the quickstart: start a ``-P asyncsql`` worker, send tasks, print results, stop it.

    python examples/quickstart/main.py [--tasks 10]
"""

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from runner import asyncsql_worker  # noqa: E402
from tasks import VAR, app, record_visit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=10)
    options = parser.parse_args()
    print(f"broker: {app.conf.broker_url}  database: {app.conf.asyncsql_database_url}")
    with asyncsql_worker(HERE, "tasks", VAR):
        results = [record_visit.delay(f"user-{i % 3}") for i in range(options.tasks)]
        for result in results:
            print(result.get(timeout=60))
    print(f"{len(results)} tasks done by a -P asyncsql worker; its log: {VAR / 'worker.log'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
