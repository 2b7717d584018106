"""A FastAPI app sharing its models and ``session()`` with the Celery tasks.

    uvicorn web:app                             # in examples/fastapi
    celery -A tasks worker -P asyncsql          # beside it

A document's task is sent when the transaction that stores it commits
(``send_on_commit``), and its result is awaited without blocking the server's
loop (``aget``): other requests, ``/health`` among them, are answered meanwhile.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from fastapi import FastAPI, HTTPException
from models import Base, Document
from pydantic import BaseModel
from tasks import app as celery_app
from tasks import count_words

from celery_asyncpool import aget, engine, open_databases, send_on_commit, session


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    """The server loop's engines, built from the Celery app's settings, disposed on it at exit."""
    async with open_databases(celery_app):
        async with engine().begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield


app = FastAPI(lifespan=lifespan)


class NewDocument(BaseModel):
    text: str
    delay_s: float = 0.0  # how long the task waits before counting (the test's slow task)
    fail: bool = False  # fail the request after the insert: rolled back, nothing sent


@app.post("/documents", status_code=202)
async def add_document(new: NewDocument) -> dict[str, object]:
    """Store a document; once it is committed, ask a worker to count its words."""
    async with session() as s, s.begin():
        document = Document(text=new.text)
        s.add(document)
        await s.flush()  # its id
        sent = send_on_commit(s, count_words.s(document.id, new.delay_s))
        if new.fail:
            raise HTTPException(422, "failed after the insert: rolled back, nothing sent")
    result = await sent  # the transaction above has committed: the worker finds the row
    return {"id": document.id, "task_id": result.id}


@app.get("/documents/{document_id}")
async def get_document(document_id: int) -> dict[str, object]:
    async with session() as s:
        document = await s.get(Document, document_id)
    if document is None:
        raise HTTPException(404, f"no document {document_id}")
    return {"id": document.id, "status": document.status, "words": document.words}


@app.get("/tasks/{task_id}/result")
async def task_result(task_id: str, timeout: float = 10) -> dict[str, object]:
    """The task's result, awaited up to ``timeout`` seconds (504 after that)."""
    try:
        value = await aget(AsyncResult(task_id, app=celery_app), timeout=timeout)
    except CeleryTimeoutError:
        raise HTTPException(504, f"task {task_id} is not done after {timeout} s") from None
    return {"result": value}


@app.get("/health")
async def health() -> dict[str, bool]:
    return {"ok": True}
