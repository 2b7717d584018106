"""The web app under uvicorn and a real ``-P asyncsql`` worker, together.

    pytest examples/fastapi
"""

import time

import httpx


def wait_for_task(web: httpx.Client, task_id: str, timeout_s: float = 30) -> dict:
    deadline = time.monotonic() + timeout_s
    while (task := web.get(f"/tasks/{task_id}").json())["state"] in ("PENDING", "STARTED"):
        assert time.monotonic() < deadline, f"task {task_id} still {task['state']}"
        time.sleep(0.1)
    return task


def test_documents_are_counted_by_the_worker(web, asyncsql_worker):
    texts = ["one", "two words", "and now three"]
    queued = [web.post("/documents", json={"text": text}).json() for text in texts]
    tasks = [wait_for_task(web, q["task_id"]) for q in queued]
    documents = [web.get(f"/documents/{q['id']}").json() for q in queued]
    assert tasks == [{"state": "SUCCESS", "result": n} for n in (1, 2, 3)]
    assert [(d["status"], d["words"]) for d in documents] == [("counted", n) for n in (1, 2, 3)]


def test_an_unknown_document_is_a_404(web):
    assert web.get("/documents/0").status_code == 404
