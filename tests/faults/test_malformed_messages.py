"""No single message stops the worker: malformed messages pushed straight onto its queue.

Each is moved out of the way, logged once, never redelivered, while the good
tasks around it run. On kombu's own Redis transport the pool guards what
Celery's consumer does with a decoded message; the envelope itself (not JSON,
no ``properties``, a body that is not base64) needs the package's transport,
which moves such a payload to ``_asyncsql.dead_letter.<queue>``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration import tasks_transport as tt
from tests.integration.conftest import RABBITMQ_URL, eventually, redis_server, run_worker

from .accounting import settle

INCLUDE = "tests.integration.tasks_transport"
OURS = "celery_asyncpool.broker:Transport"
TASK = "tests.integration.tasks_transport.async_echo"
BAD_EXAMPLES = 20


def envelope(queue: str, *, body: object = (), headers: object = None,
             content_type: str = "application/json", content_encoding: str = "utf-8",
             raw_body: str | None = None) -> dict:
    """A kombu message as kombu's Redis transport stores it, for a Celery task unless told."""
    task_id = str(uuid.uuid4())
    if headers is None:
        headers = {"lang": "py", "task": TASK, "id": task_id, "root_id": task_id,
                   "parent_id": None, "group": None, "retries": 0, "eta": None,
                   "expires": None, "timelimit": [None, None], "argsrepr": "()",
                   "kwargsrepr": "{}", "origin": "fuzzer"}
    if raw_body is None:
        raw_body = base64.b64encode(json.dumps(body).encode()).decode()
    return {"body": raw_body, "content-encoding": content_encoding, "content-type": content_type,
            "headers": headers,
            "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                           "delivery_info": {"exchange": "", "routing_key": queue},
                           "priority": 0, "body_encoding": "base64",
                           "delivery_tag": str(uuid.uuid4())}}


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=12)
                    | st.floats(allow_nan=False, allow_infinity=False),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


@st.composite
def decoded_message(draw, queue: str) -> bytes:
    """A well-formed envelope whose Celery side is wrong: body, headers, content type."""
    good = envelope(queue, body=[[1], {}, {}])
    kind = draw(st.sampled_from(["body", "headers", "header", "content", "args"]))
    if kind == "body":
        message = envelope(queue, body=draw(JSON))
    elif kind == "headers":
        # A dict, or kombu's transport could not read the envelope (that is the transport's).
        message = envelope(queue, headers=draw(st.dictionaries(st.text(max_size=8), JSON,
                                                                 max_size=6)))
    elif kind == "header":
        headers = dict(good["headers"])
        for key in draw(st.lists(st.sampled_from(sorted(headers)), min_size=1, max_size=4)):
            headers[key] = draw(JSON)
        headers["task"] = draw(st.sampled_from([TASK, TASK, None, 7, ["x"]]))
        message = envelope(queue, headers=headers, body=draw(st.sampled_from(
            [[[1], {}, {}], [1, {}, {}], [[1], [], {}]])))
    elif kind == "content":
        message = envelope(queue, body=[[1], {}, {}],
                           content_type=draw(st.sampled_from(
                               ["application/x-unknown", "", "application/x-python-serialize"])),
                           content_encoding=draw(st.sampled_from(["utf-8", "rot13", "binary"])))
    else:
        message = envelope(queue, body=[draw(JSON.filter(lambda v: not isinstance(v, list))),
                                        {}, {}])
    return json.dumps(message).encode()


@st.composite
def any_message(draw, queue: str) -> bytes:
    """Anything at all on the queue: the envelope broken too."""
    good = json.dumps(envelope(queue, body=[[1], {}, {}])).encode()
    kind = draw(st.sampled_from(["decoded", "bytes", "truncated", "json", "properties",
                                 "base64", "tag", "headers"]))
    if kind == "decoded":
        return draw(decoded_message(queue))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "truncated":
        return good[:draw(st.integers(0, len(good) - 1))]
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    message = envelope(queue, body=[[1], {}, {}])
    if kind == "properties":
        message["properties"] = draw(st.sampled_from([None, [], "x", {}]))
    elif kind == "headers":
        message["headers"] = draw(JSON.filter(lambda v: not isinstance(v, dict)))
    elif kind == "base64":
        message["body"] = draw(st.sampled_from(["%%% not base64 %%%", "YQ", "\u00e9t\u00e9"]))
    else:
        message["properties"]["delivery_tag"] = draw(JSON)
    return json.dumps(message).encode()


@pytest.mark.parametrize("transport", [pytest.param(None, id="kombu"),
                                       pytest.param(OURS, id="ours")])
def test_random_bad_messages_between_good_tasks(tmp_path, transport):
    """Bad messages from a fuzzer, each between good tasks; the good all run, the worker
    stays up, nothing is left in the queue or unacked (no redelivery loop)."""
    conf = {"broker_transport": transport} if transport else {}
    with redis_server() as url, run_worker(tmp_path, concurrency=8, include=INCLUDE, conf=conf,
                                           broker=url) as worker:
        client = redis.Redis.from_url(url)
        strategy = any_message(worker.queue) if transport else decoded_message(worker.queue)
        good: list = []
        bad: list[bytes] = []

        # No shrinking: each example costs a real round trip, and the failing one is printed.
        @settings(max_examples=BAD_EXAMPLES, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(message=strategy)
        def one(message: bytes) -> None:
            good.append(worker.send(tt.async_echo, len(good)))
            client.lpush(worker.queue, message)
            bad.append(message)
            result = worker.send(tt.async_echo, len(good))
            good.append(result)
            assert result.get(timeout=15) == len(good) - 1, "served after a bad message"

        one()
        assert worker.proc.poll() is None, worker.logs()[-3000:]
        assert [r.get(timeout=30) for r in good] == list(range(len(good)))
        eventually(lambda: client.llen(worker.queue) == 0 and client.hlen("unacked") == 0, 20,
                   "no message left in the queue or unacked")
        logs = worker.logs()
        assert "Unrecoverable error" not in logs
        if transport:
            dead = client.llen(f"_asyncsql.dead_letter.{worker.queue}")
            assert 0 < dead <= len(bad), (dead, len(bad))
    account = settle(f"{len(bad)} fuzzed bad messages between good tasks "
                     f"({'ours' if transport else 'kombu'})", [r.id for r in good], run=None)
    assert account.missing == [] and account.once == len(good)


ENVELOPES = [
    ("not JSON", b"this is {not json"),
    ("a JSON envelope without properties", json.dumps({"body": "", "headers": {}}).encode()),
    ("a JSON list", b"[1, 2, 3]"),
    ("50 MB of garbage", b"\x00garbage" * 6_553_600),
]
DECODED = [
    ("a dict body", {"hello": "world"}, None),
    ("a string body", "just a string", None),
    ("args that are not a list", [7, {}, {}], None),
    ("headers of wrong types", [[1], {}, {}], {"task": TASK, "id": 5, "retries": "x",
                                               "timelimit": "y"}),
]


def test_each_envelope_kombu_cannot_read_is_dead_lettered_on_our_transport(tmp_path):
    """One after the other, on one worker: each moved aside, logged once, the next task runs."""
    with redis_server() as url, run_worker(tmp_path, concurrency=4, include=INCLUDE,
                                           conf={"broker_transport": OURS},
                                           broker=url) as worker:
        client = redis.Redis.from_url(url)
        dead = f"_asyncsql.dead_letter.{worker.queue}"
        for count, (name, payload) in enumerate(ENVELOPES, 1):
            client.lpush(worker.queue, payload)
            assert worker.send(tt.async_echo, name).get(timeout=30) == name
            eventually(lambda: client.llen(dead) == count, 10, f"{name} dead-lettered")
            assert payload in (client.lindex(dead, 0), client.lindex(dead, -1)), name
            assert worker.logs().count(repr(dead)) == count, f"{name} logged once"


@pytest.mark.parametrize("transport", [pytest.param(None, id="kombu"),
                                       pytest.param(OURS, id="ours"),
                                       pytest.param(RABBITMQ_URL, id="rabbitmq")])
def test_each_message_celery_cannot_run_is_logged_once_and_never_redelivered(tmp_path,
                                                                             transport):
    """What Celery's consumer does with a decoded message, case by case on one worker: ours
    ("is not a task this worker can run", rejected) or Celery's own rule (here the task
    failing on its arguments), logged once; nothing left to redeliver; the next task runs.
    On RabbitMQ too: the envelope is AMQP's, but what it carries can be as bad."""
    on_rabbitmq = transport == RABBITMQ_URL
    conf = {"broker_transport": transport} if transport and not on_rabbitmq else {}
    with contextlib.ExitStack() as stack:
        url = RABBITMQ_URL if on_rabbitmq else stack.enter_context(redis_server())
        worker = stack.enter_context(run_worker(tmp_path, concurrency=4, include=INCLUDE,
                                                conf=conf, broker=url))
        push, left = (_on_rabbitmq(worker) if on_rabbitmq else _on_redis(worker, url))

        def errors() -> list[str]:
            return [line for line in worker.logs().splitlines() if ": ERROR/" in line]

        for count, (name, body, headers) in enumerate(DECODED, 1):
            push(body, headers)
            assert worker.send(tt.async_echo, name).get(timeout=30) == name
            eventually(lambda: left() == 0, 20, f"{name}: nothing left to redeliver")
            # A task failing on its arguments logs from its child, maybe after the good one.
            eventually(lambda: len(errors()) >= count, 10, f"{name} logged")
            time.sleep(0.3)
            assert len(errors()) == count, f"{name}: {worker.logs()[-3000:]}"
        assert worker.proc.poll() is None and "Unrecoverable error" not in worker.logs()


def _on_redis(worker, url: str):
    """Push a message as kombu's Redis transport stores it; count what is queued or unacked."""
    client = redis.Redis.from_url(url)

    def push(body: object, headers: object) -> None:
        client.lpush(worker.queue, json.dumps(envelope(worker.queue, body=body,
                                                       headers=headers)).encode())

    return push, lambda: client.llen(worker.queue) + client.hlen("unacked")


def _on_rabbitmq(worker):
    """Publish a message with the same body and headers; count what is ready or unacked."""
    def push(body: object, headers: object) -> None:
        headers = envelope(worker.queue)["headers"] if headers is None else headers
        with worker.connection().Producer() as producer:
            producer.publish(body, routing_key=worker.queue, headers=headers,
                             serializer="json")

    def left() -> int:
        listing = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name", "messages"],
                                 capture_output=True, text=True, check=True).stdout
        counts = dict(line.split("\t") for line in listing.splitlines() if "\t" in line)
        return int(counts.get(worker.queue, 0))

    return push, left
