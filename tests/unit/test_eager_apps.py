"""Eager async bodies use the engines of their own app's settings."""

from celery import Celery

from celery_asyncpool import AsyncTask, engine


def test_each_app_gets_its_own_eager_engines(tmp_path):
    tasks = []
    for name in ("first", "second"):
        app = Celery(name, set_as_current=False)
        app.conf.asyncsql_database_url = f"sqlite+aiosqlite:///{tmp_path}/{name}.db"

        @app.task(base=AsyncTask, name=f"{name}.database")
        async def database() -> str:
            return engine().url.database

        tasks.append(database)
    assert [task.apply().get() for task in tasks] == [
        f"{tmp_path}/first.db", f"{tmp_path}/second.db"]
