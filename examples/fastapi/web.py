"""A FastAPI app sharing its models and ``session()`` with the Celery tasks.

    uvicorn web:app                             # in examples/fastapi
    celery -A tasks worker -P asyncsql          # beside it
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from celery.result import AsyncResult
from fastapi import FastAPI, HTTPException
from models import Base, Document
from pydantic import BaseModel
from tasks import app as celery_app
from tasks import count_words

from celery_asyncpool import engine, open_databases, session


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


@app.post("/documents", status_code=202)
async def add_document(new: NewDocument) -> dict[str, object]:
    """Store a document, then ask a worker to count its words."""
    async with session() as s, s.begin():
        document = Document(text=new.text)
        s.add(document)
    # Committed above, so the worker finds the row. Publishing is blocking I/O:
    # keep it off the server's loop.
    result = await asyncio.to_thread(count_words.delay, document.id)
    return {"id": document.id, "task_id": result.id}


@app.get("/documents/{document_id}")
async def get_document(document_id: int) -> dict[str, object]:
    async with session() as s:
        document = await s.get(Document, document_id)
    if document is None:
        raise HTTPException(404, f"no document {document_id}")
    return {"id": document.id, "status": document.status, "words": document.words}


@app.get("/tasks/{task_id}")
def get_task(task_id: str) -> dict[str, object]:
    """A task's state and result (a sync handler: FastAPI runs it off the loop)."""
    result = AsyncResult(task_id, app=celery_app)
    value = result.result if result.successful() else None
    return {"state": result.state, "result": value}
