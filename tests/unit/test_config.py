"""Settings validation: every bad value names the key, the value and what is expected."""

import re
import sys

import pytest

from celery_asyncpool.config import KNOWN_KEYS, Settings
from celery_asyncpool.errors import ConfigurationError

PG = "postgresql+asyncpg://app:s3cret@db/app"


def test_defaults_without_any_setting():
    settings = Settings.from_conf({})
    assert settings.processes is None
    assert settings.databases == ()
    assert settings.connection_cap == 80
    assert settings.loop_block_warning_s == 1.0


def test_the_loop_watchdog_can_be_turned_off():
    assert Settings.from_conf({"asyncsql_loop_block_warning_s": None}).loop_block_warning_s is None


def test_unknown_key_suggests_the_closest_and_lists_the_known():
    with pytest.raises(ConfigurationError, match=r"'asyncsql_proceses'.*Did you mean "
                                                 r"'asyncsql_processes'.*Known settings: "):
        Settings.from_conf({"asyncsql_proceses": 2})


def test_other_settings_are_not_ours_to_judge():
    Settings.from_conf({"database_url": "x", "worker_concurrency": 4})


@pytest.mark.parametrize("key,value,expected", [
    ("asyncsql_processes", -1, "a whole number >= 1"),
    ("asyncsql_processes", "2", "a whole number >= 1"),
    ("asyncsql_processes", True, "a whole number >= 1"),
    ("asyncsql_connection_cap", 0, "a whole number >= 1"),
    ("asyncsql_hook_timeout_s", 0, r"a number of seconds > 0"),
    ("asyncsql_cancel_grace_s", -1, r"a number of seconds >= 0"),
    ("asyncsql_loop_block_warning_s", 0, r"a number of seconds > 0, or None"),
    ("asyncsql_loop_block_warning_s", "1", r"a number of seconds > 0, or None"),
    ("asyncsql_engine_options", ["pool_size"], "a dict"),
    ("asyncsql_database_url", 5, "an async SQLAlchemy URL"),
])
def test_wrong_type_or_range_names_key_value_and_expectation(key, value, expected):
    with pytest.raises(ConfigurationError, match=rf"Setting {key} has value {re.escape(repr(value))}; expected {expected}"):
        Settings.from_conf({key: value})


def test_sync_driver_is_refused_with_the_async_one_to_use_and_no_password():
    with pytest.raises(ConfigurationError, match=r"driver 'psycopg2' is not async.*"
                                                 r"'postgresql\+asyncpg://\.\.\.'") as caught:
        Settings.from_conf({"asyncsql_database_url": "postgresql+psycopg2://app:s3cret@db/app"})
    assert "s3cret" not in str(caught.value)


def test_unknown_dialect_is_refused():
    with pytest.raises(ConfigurationError, match="does not know"):
        Settings.from_conf({"asyncsql_database_url": "nosuchdb+x://h/db"})


def test_named_databases_take_a_url_or_a_dict():
    settings = Settings.from_conf({
        "asyncsql_database_url": PG,
        "asyncsql_engine_options": {"pool_pre_ping": True},
        "asyncsql_databases": {
            "reports": "sqlite+aiosqlite:///reports.db",
            "audit": {"url": PG, "engine_options": {"echo": True},
                      "session_options": {"autoflush": False}},
        },
    })
    assert [d.name for d in settings.databases] == ["default", "reports", "audit"]
    assert settings.database("default").engine_options == {"pool_pre_ping": True}
    assert settings.database("audit").session_options == {"autoflush": False}
    assert settings.database("audit").masked_url == "postgresql+asyncpg://app:***@db/app"


def test_pgbouncer_applies_to_every_database_unless_an_entry_says_otherwise():
    settings = Settings.from_conf({
        "asyncsql_database_url": PG, "asyncsql_pgbouncer": True,
        "asyncsql_databases": {"reports": PG, "direct": {"url": PG, "pgbouncer": False}},
    })
    assert [d.pgbouncer for d in settings.databases] == [True, True, False]
    alone = Settings.from_conf({"asyncsql_databases": {"pooled": {"url": PG, "pgbouncer": True}}})
    assert alone.database("pooled").pgbouncer is True


def test_a_pgbouncer_entry_that_is_not_a_bool_is_refused_without_the_password():
    with pytest.raises(ConfigurationError, match=r"\['pgbouncer'\] has value 'yes'") as info:
        Settings.from_conf({"asyncsql_databases": {"x": {"url": PG, "pgbouncer": "yes"}}})
    with pytest.raises(ConfigurationError, match="expected a URL string") as unknown:
        Settings.from_conf({"asyncsql_databases": {"x": {"url": PG, "pool": 1}}})
    assert "s3cret" not in str(info.value) + str(unknown.value)


def test_a_named_database_spec_without_url_is_refused():
    with pytest.raises(ConfigurationError, match=r"asyncsql_databases\['x'\].*expected a URL"):
        Settings.from_conf({"asyncsql_databases": {"x": {"engine_options": {}}}})


def test_default_may_be_defined_only_once():
    with pytest.raises(ConfigurationError, match="set only one of them"):
        Settings.from_conf({"asyncsql_database_url": PG, "asyncsql_databases": {"default": PG}})


def test_unknown_database_name_lists_the_configured_ones():
    settings = Settings.from_conf({"asyncsql_database_url": PG})
    with pytest.raises(ConfigurationError, match=r"No database named 'other'; configured "
                                                 r"databases: 'default'"):
        settings.database("other")


def test_no_database_configured_says_which_setting_to_set():
    with pytest.raises(ConfigurationError, match="Set asyncsql_database_url"):
        Settings.from_conf({}).database("default")


def test_every_option_is_documented():
    from celery_asyncpool.config import OPTIONS

    assert len(set(KNOWN_KEYS)) == len(OPTIONS)
    assert all(option.doc and option.expected for option in OPTIONS)


def test_settings_page_matches_the_definitions():
    from pathlib import Path

    from celery_asyncpool.config import settings_reference

    page = (Path(__file__).parents[2] / "docs" / "settings.md").read_text()
    found = re.search(r"<!-- settings-reference: start -->\n(.*?)\n"
                      r"<!-- settings-reference: end -->", page, re.S)
    assert found, "docs/settings.md lost its settings-reference markers"
    assert found.group(1).strip() == settings_reference(), (
        "docs/settings.md is out of date: replace the table between its markers with the output "
        "of: python -c 'from celery_asyncpool.config import settings_reference as s; print(s())'")


def test_masked_values_hide_every_url_password_and_leave_the_rest():
    from celery_asyncpool.config import masked_values

    value = {"a": ["postgresql+asyncpg://user:p%40ss@host:5432/db", "no url", 3],
             "b": {"c": "see redis://:secret@127.0.0.1:6379/0 and sqlite+aiosqlite:///x.db"}}
    assert masked_values(value) == {
        "a": ["postgresql+asyncpg://user:***@host:5432/db", "no url", 3],
        "b": {"c": "see redis://:***@127.0.0.1:6379/0 and sqlite+aiosqlite:///x.db"}}


def test_masked_values_hide_what_a_secret_key_holds():
    from celery_asyncpool.config import masked_values

    options = {"connect_args": {"password": "pw", "server_settings": {"a": "b"}},
               "pool_size": 5, "client_secret": ["x"], "api_token": 3}
    assert masked_values(options) == {
        "connect_args": {"password": "********", "server_settings": {"a": "b"}},
        "pool_size": 5, "client_secret": "********", "api_token": "********"}


def test_celerys_censored_settings_views_hide_nested_urls_once_the_package_is_imported():
    """``celery report`` and ``inspect conf`` go through conf.humanize()/table(censored=True)."""
    import celery_asyncpool  # noqa: F401  wraps Celery's filter on import
    from celery import Celery

    app = Celery("report", set_as_current=False)
    app.conf.asyncsql_databases = {"reports": "postgresql+asyncpg://u:hunter2@h/db",
                                   "archive": {"url": "postgresql+asyncpg://u:hunter2@h/a"}}
    app.conf.asyncsql_engine_options = {"connect_args": {"password": "hunter2"}}
    shown = app.conf.humanize(with_defaults=False, censored=True)
    assert "hunter2" not in shown and "postgresql+asyncpg://u:***@h/db" in shown
    assert "hunter2" not in repr(app.conf.table(with_defaults=False, censored=True))


def test_the_loop_is_asyncio_unless_uvloop_is_asked_for():
    assert Settings.from_conf({}).loop == "asyncio"
    assert Settings.from_conf({"asyncsql_loop": "uvloop"}).loop == "uvloop"


def test_an_unknown_loop_names_the_choices():
    with pytest.raises(ConfigurationError, match=r"asyncsql_loop has value 'trio'; "
                                                 r"expected 'asyncio' or 'uvloop'"):
        Settings.from_conf({"asyncsql_loop": "trio"})


def test_uvloop_asked_for_but_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # what `import uvloop` meets when absent
    with pytest.raises(ConfigurationError, match=re.escape(
            "pip install 'celery-asyncpool[uvloop]'")):
        Settings.from_conf({"asyncsql_loop": "uvloop"})


@pytest.mark.parametrize("name,loop_module", [("asyncio", "asyncio"), ("uvloop", "uvloop")])
def test_the_runtime_builds_the_loop_named(name, loop_module):
    from celery_asyncpool.child.runtime import Runtime
    from celery_asyncpool.databases.engines import Sizing

    settings = Settings.from_conf({"asyncsql_loop": name})
    runtime = Runtime(settings, Sizing(None, 1, 1), own_thread=False)
    try:
        assert type(runtime.loop).__module__.split(".")[0] == loop_module
        assert runtime.run(_loop_module()) == loop_module
    finally:
        runtime.stop(run_hooks=False)


async def _loop_module():
    import asyncio

    return type(asyncio.get_running_loop()).__module__.split(".")[0]
