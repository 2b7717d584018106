"""Run the mixed example: sync and async tasks, chained, in one ``-P asyncsql`` worker.

    python examples/mixed/main.py [--files 6]
"""

import argparse
import sys
from pathlib import Path

from celery import chain

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from runner import asyncsql_worker  # noqa: E402
from tasks import VAR, Base, checksum, count_checksums, store_checksum, sync_engine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=6)
    options = parser.parse_args()
    VAR.mkdir(parents=True, exist_ok=True)  # the SQLite default lives there
    Base.metadata.drop_all(sync_engine)
    Base.metadata.create_all(sync_engine)
    sync_engine.dispose()
    with asyncsql_worker(HERE, "tasks", VAR):
        # The sync task's result is the async task's first argument.
        results = [chain(checksum.s(f"contents of file {i}"), store_checksum.s(f"file-{i}"))()
                   for i in range(options.files)]
        for result in results:
            print(result.get(timeout=60))
        print(f"counted by a sync task: {count_checksums.delay().get(timeout=60)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
