"""The web app under uvicorn and a real ``-P asyncsql`` worker, together.

    pytest examples/fastapi
"""

import asyncio
import threading
import time

import httpx


def test_documents_are_counted_by_the_worker(web, asyncsql_worker):
    texts = ["one", "two words", "and now three"]
    queued = [web.post("/documents", json={"text": text}).json() for text in texts]
    results = [web.get(f"/tasks/{q['task_id']}/result", params={"timeout": 30}).json()
               for q in queued]
    documents = [web.get(f"/documents/{q['id']}").json() for q in queued]
    assert results == [{"result": n} for n in (1, 2, 3)]
    assert [(d["status"], d["words"]) for d in documents] == [("counted", n) for n in (1, 2, 3)]


def test_a_rolled_back_request_sends_nothing(web, asyncsql_worker):
    before = asyncsql_worker.logs().count("received")
    failed = web.post("/documents", json={"text": "never counted", "fail": True})
    after = web.post("/documents", json={"text": "counted"}).json()
    assert web.get(f"/tasks/{after['task_id']}/result", params={"timeout": 30}).json() == {
        "result": 1}
    assert failed.status_code == 422
    assert asyncsql_worker.logs().count("received") == before + 1, "only the committed one"


def test_200_requests_await_one_result_and_the_server_answers_meanwhile(web, asyncsql_worker):
    """200 requests await one 3 s task; /health is asked every 0.1 s from a thread of its
    own (this test's loop is busy with the 200 responses), and answers in well under 1 s."""
    queued = web.post("/documents", json={"text": "slow to count", "delay_s": 3}).json()
    latencies: list[float] = []
    done = threading.Event()

    def ping() -> None:
        with httpx.Client(base_url=str(web.base_url), timeout=10) as client:
            while not done.is_set():
                started = time.monotonic()
                assert client.get("/health").json() == {"ok": True}
                latencies.append(time.monotonic() - started)
                time.sleep(0.1)

    async def scenario():
        async with httpx.AsyncClient(base_url=str(web.base_url), timeout=60,
                                     limits=httpx.Limits(max_connections=250)) as client:
            return await asyncio.gather(*(client.get(f"/tasks/{queued['task_id']}/result",
                                                     params={"timeout": 30})
                                          for _ in range(200)))

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        answers = asyncio.run(scenario())
    finally:
        done.set()
        pinger.join(10)
    assert [a.json() for a in answers] == [{"result": 3}] * 200, "each woken once, with it"
    assert len(latencies) >= 10 and max(latencies) < 0.5, \
        f"/health took up to {max(latencies):.2f} s while 200 requests awaited"


def test_an_unknown_document_is_a_404(web):
    assert web.get("/documents/0").status_code == 404
