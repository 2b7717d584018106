"""The benchmark: ``-P asyncsql`` against what Celery users run today, side by side in one run.

Run it with ``scripts/benchmark`` (see benchmarks/README.md).
"""
