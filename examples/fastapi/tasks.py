"""The FastAPI example's Celery app and task; the web app (``web.py``) imports both.

Same defaults as the quickstart (no server needed): SQLite, kombu's filesystem
broker and a file result backend under ``./var``. FASTAPI_DATABASE_URL,
FASTAPI_BROKER and FASTAPI_BACKEND point it at PostgreSQL and Redis.
"""

import asyncio
import os
from pathlib import Path

from celery import Celery
from models import Document

from celery_asyncpool import bind, session

VAR = Path(os.environ.get("FASTAPI_VAR", Path(__file__).parent / "var")).resolve()

# bind(): session() outside the worker (in the web app) takes this app's settings.
app = bind(Celery("fastapi_example", task_cls="celery_asyncpool:AsyncTask"))
app.conf.update(
    broker_url=os.environ.get("FASTAPI_BROKER", "filesystem://"),
    broker_transport_options={"data_folder_in": str(VAR / "broker"),
                              "data_folder_out": str(VAR / "broker"),
                              "control_folder": str(VAR / "control")},
    result_backend=os.environ.get("FASTAPI_BACKEND", f"file://{VAR / 'results'}"),
    task_default_queue=os.environ.get("FASTAPI_QUEUE", "fastapi-example"),  # the worker's too
    asyncsql_database_url=os.environ.get("FASTAPI_DATABASE_URL",
                                         f"sqlite+aiosqlite:///{VAR / 'fastapi.db'}"),
    asyncsql_engine_options={"pool_pre_ping": True},
)
for folder in ("broker", "control", "results"):
    (VAR / folder).mkdir(parents=True, exist_ok=True)


@app.task
async def count_words(document_id: int, delay_s: float = 0.0) -> int:
    """Count a document's words and store the count, on the worker's engine and loop;
    after ``delay_s`` (the example's test makes one slow to count)."""
    await asyncio.sleep(delay_s)
    async with session() as s, s.begin():
        document = await s.get_one(Document, document_id)
        document.words = len(document.text.split())
        document.status = "counted"
    return document.words
