"""Tasks for test_task_semantics: each async task has a sync twin for stock prefork.

The signal receivers below record, in Redis, what each worker process sees of
these tasks, one list per (task id, attempt), so a test can compare the
sequence on ``-P asyncsql`` with the one on prefork.
"""

import asyncio
import json
import os
import time

import redis
from celery import current_task, signals
from celery.exceptions import Ignore, Reject
from celery.utils.log import get_task_logger

from .app import BACKEND_URL, BROKER_URL, app

logger = get_task_logger(__name__)

_clients = {}


def client(url=BACKEND_URL):
    """A Redis client of this process's own (never one inherited across fork)."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url)
    return _clients[key]


def events_key(task_id, attempt):
    return f"itest-semantics:{task_id}:{attempt}"


def release_key(task_id):
    return f"itest-semantics:release:{task_id}"


def record(task_id, attempt, event):
    key = events_key(task_id, attempt)
    client().rpush(key, event)
    client().expire(key, 600)


def events(task_id, attempt):
    return [e.decode() for e in client().lrange(events_key(task_id, attempt), 0, -1)]


def unacked_task_ids():
    """Ids of the messages kombu's Redis transport holds as delivered but unacked."""
    messages = [json.loads(raw)[0] for raw in client(BROKER_URL).hvals("unacked")]
    return {message.get("headers", {}).get("id") for message in messages}


def _ours(task):
    return getattr(task, "name", "").startswith(__name__ + ".")


@signals.before_task_publish.connect
def _on_publish(sender=None, headers=None, **_):
    # Only re-publishes from inside one of our tasks (a retry), not the test's own sends.
    task = current_task._get_current_object()
    if _ours(task) and headers["id"] == task.request.id:
        record(task.request.id, task.request.retries, f"publish:{headers['retries']}")


@signals.task_prerun.connect
def _on_prerun(sender=None, task_id=None, **_):
    if _ours(sender):
        record(task_id, sender.request.retries, f"prerun:{sender.request.retries}")


@signals.task_success.connect
def _on_success(sender=None, **_):
    if _ours(sender):
        record(sender.request.id, sender.request.retries, "success")


@signals.task_failure.connect
def _on_failure(sender=None, task_id=None, exception=None, **_):
    if _ours(sender):
        record(task_id, sender.request.retries, f"failure:{type(exception).__name__}")


@signals.task_retry.connect
def _on_retry(sender=None, request=None, **_):
    if _ours(sender):
        record(request.id, request.retries, "retry")


@signals.task_postrun.connect
def _on_postrun(sender=None, task_id=None, state=None, **_):
    if not _ours(sender):
        return
    event = f"postrun:{state}"
    if sender.acks_late:
        stored = sender.backend.get_task_meta(task_id)["status"]
        event += f":stored={stored}:unacked={task_id in unacked_task_ids()}"
    record(task_id, sender.request.retries, event)


# Row 5: request identity before and after awaits, and in log records.

def _identity(task):
    return [task.request.id, task.request.retries, current_task.request.id, current_task.name]


@app.task(bind=True, max_retries=1, default_retry_delay=0)
async def async_identity(self, token, earlier=()):
    seen = [_identity(self)]
    logger.info("identity token=%s attempt=%s before", token, self.request.retries)
    await asyncio.sleep(0.02)
    seen.append(_identity(self))
    seen.append(await asyncio.to_thread(_identity, self))
    logger.info("identity token=%s attempt=%s after", token, self.request.retries)
    if self.request.retries == 0:
        raise self.retry(kwargs={"earlier": seen})
    return [*earlier, *seen]


@app.task(bind=True, max_retries=1, default_retry_delay=0)
def sync_identity(self, token, earlier=()):
    seen = [_identity(self)]
    logger.info("identity token=%s attempt=%s before", token, self.request.retries)
    time.sleep(0.02)
    seen.append(_identity(self))
    logger.info("identity token=%s attempt=%s after", token, self.request.retries)
    if self.request.retries == 0:
        raise self.retry(kwargs={"earlier": seen})
    return [*earlier, *seen]


# Rows 6 and 7: one body per outcome, reached after an await (async) or a sleep (sync).

OUTCOME_OPTIONS = dict(bind=True, max_retries=2, default_retry_delay=0, autoretry_for=(KeyError,))


def _outcome(task, mode):
    retries = task.request.retries
    record(task.request.id, retries, f"body:{retries}")
    if mode == "succeed":
        return retries
    if mode == "fail":
        raise ValueError("boom")
    if mode == "retry_once":
        if retries < 1:
            raise task.retry()
        return retries
    if mode == "retry_forever":
        raise task.retry(exc=ValueError(f"attempt {retries}"))
    if mode == "autoretry":
        if retries < 2:
            raise KeyError("again")
        return retries
    if mode == "reject":
        raise Reject("no thanks", requeue=False)
    if mode == "ignore":
        raise Ignore()
    raise AssertionError(mode)


@app.task(**OUTCOME_OPTIONS)
async def async_outcome(self, mode):
    await asyncio.sleep(0.01)
    return _outcome(self, mode)


@app.task(**OUTCOME_OPTIONS)
def sync_outcome(self, mode):
    time.sleep(0.01)
    return _outcome(self, mode)


# Row 8: acks_late tasks that run until the test releases them.

@app.task(bind=True, acks_late=True)
async def async_hold(self):
    record(self.request.id, 0, "started")
    deadline = time.monotonic() + 30
    while not client().exists(release_key(self.request.id)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return "released"


@app.task(bind=True, acks_late=True)
def sync_hold(self):
    record(self.request.id, 0, "started")
    deadline = time.monotonic() + 30
    while not client().exists(release_key(self.request.id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return "released"
