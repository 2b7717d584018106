"""session() and engine() outside a worker child: one engine set per loop, disposed on it."""

import asyncio
import subprocess
import sys

import pytest
from celery import Celery
from sqlalchemy import text

from celery_asyncpool import ConfigurationError, NoRuntimeError, engine, open_databases, session
from celery_asyncpool.databases import standalone
from celery_asyncpool.child.runtime import Runtime
from celery_asyncpool.config import Settings
from celery_asyncpool.databases.engines import Sizing, registered


def _app(tmp_path, name="web", file="web.db"):
    app = Celery(name, set_as_current=False)
    app.conf.asyncsql_database_url = f"sqlite+aiosqlite:///{tmp_path / file}"
    return app


@pytest.fixture
def bound(tmp_path, monkeypatch):
    app = _app(tmp_path)
    monkeypatch.setattr(standalone, "_bound", None)
    assert standalone.bind(app) is app
    return app


async def _answer():
    async with session() as s:
        return (await s.execute(text("SELECT 41 + 1"))).scalar_one()


def test_open_databases_builds_on_enter_and_disposes_on_exit(bound):
    async def main():
        async with open_databases():
            built = registered()
            assert await _answer() == 42
            assert engine() is engine() is built.engines["default"]
        return built

    built = asyncio.run(main())  # filterwarnings=error: no undisposed warning either
    assert not built.open


def test_each_loop_gets_its_own_engine(bound):
    async def main():
        async with open_databases(bound):
            return engine()

    assert asyncio.run(main()) is not asyncio.run(main())


def test_nested_opens_share_the_engines_and_the_last_exit_disposes(bound):
    async def main():
        async with open_databases(bound):
            async with open_databases():
                first = engine()
            assert registered().open and engine() is first
            built = registered()
        assert registered() is None
        return built

    assert not asyncio.run(main()).open


def test_engines_left_open_are_disposed_with_a_warning_when_their_loop_ends(bound, caplog):
    async def main():
        assert await _answer() == 42  # built on first use, never disposed by the caller
        return registered()

    with pytest.warns(ResourceWarning, match=r"not disposed before their loop shut down"):
        built = asyncio.run(main())
    assert not built.open
    assert "open_databases(app)" in caplog.text


def test_an_engine_still_open_at_interpreter_exit_is_reported(tmp_path):
    script = f"""
import asyncio
from celery import Celery
from celery_asyncpool import bind, engine
bind(Celery("script")).conf.asyncsql_database_url = "sqlite+aiosqlite:///{tmp_path}/exit.db"
loop = asyncio.new_event_loop()
async def use():
    engine()
loop.run_until_complete(use())
loop.close()  # without shutdown_asyncgens(): nothing disposed the engine
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "were not disposed before the interpreter exited" in done.stderr


def test_without_an_app_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setattr(standalone, "_bound", None)
    plain = Celery("plain")  # Celery's current app, without asyncsql settings

    async def outside():
        return session()

    with pytest.raises(NoRuntimeError, match=r"celery_asyncpool.bind\(app\).*'plain'"):
        asyncio.run(outside())
    with pytest.raises(NoRuntimeError, match="needs a running event loop"):
        session()
    assert plain.main == "plain"


def test_celerys_current_app_is_used_when_it_configures_a_database(tmp_path, monkeypatch):
    monkeypatch.setattr(standalone, "_bound", None)
    current = _app(tmp_path, "current")
    current.set_current()

    async def main():
        async with open_databases():
            return await _answer(), registered().settings.database("default").url

    assert asyncio.run(main()) == (42, current.conf.asyncsql_database_url)


def test_one_loop_takes_one_apps_settings(bound, tmp_path):
    other = _app(tmp_path, "other", "other.db")

    async def main():
        async with open_databases(bound):
            with pytest.raises(ConfigurationError, match="already built from other"):
                async with open_databases(other):
                    pass

    asyncio.run(main())


def test_a_runtime_loop_keeps_its_own_engines(tmp_path, bound):
    settings = Settings.from_conf({"asyncsql_database_url": f"sqlite+aiosqlite:///{tmp_path}/r.db"})
    runtime = Runtime(settings, Sizing(1, 1, 80))
    runtime.start(run_hooks=False)

    async def inside():
        async with open_databases(bound):
            return engine()

    try:
        assert runtime.run(inside()) is runtime.databases.engines["default"]
        assert runtime.databases.open, "the runtime disposes its engines, not open_databases"
    finally:
        runtime.stop(run_hooks=False)
