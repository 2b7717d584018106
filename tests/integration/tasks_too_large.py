"""Lowers the largest value Celery's Redis backend stores, in the worker that imports it."""

from celery.backends.redis import RedisBackend

RedisBackend._MAX_STR_VALUE_SIZE = 20_000
