"""The public surface, registration and its guard against Celery changes."""

import subprocess
import sys
import types

import pytest

import celery_asyncpool
from celery_asyncpool import registration
from celery_asyncpool.errors import AsyncPoolError


@pytest.fixture(autouse=True)
def eager_check_kept():
    """A worker_init sent here stands for a worker, which turns the eager-mode check off in
    its process (celery_asyncpool.task): turn it back on for the tests run after these."""
    yield
    from celery import signals

    from celery_asyncpool import task

    signals.task_postrun.connect(task._on_task_postrun, weak=False)


def test_all_lists_exactly_the_public_names():
    public = {name for name in dir(celery_asyncpool) if not name.startswith("_")}
    modules = {name for name in public
               if isinstance(getattr(celery_asyncpool, name), types.ModuleType)}
    assert set(celery_asyncpool.__all__) == public - modules


def test_pool_name_is_registered_for_config_and_cli():
    from celery import concurrency
    from celery.bin.worker import WORKERS_POOL

    registration.register()
    assert concurrency.ALIASES["asyncsql"] == "celery_asyncpool.pool:TaskPool"
    assert "asyncsql" in WORKERS_POOL.choices
    assert concurrency.get_implementation("asyncsql") is celery_asyncpool.TaskPool


def test_a_celery_that_moved_the_cli_choices_fails_loudly(monkeypatch):
    moved = types.ModuleType("celery.bin.worker")
    monkeypatch.setitem(sys.modules, "celery.bin.worker", moved)
    with pytest.raises(AsyncPoolError, match="worker_pool = 'asyncsql'"):
        registration.register()


def test_the_celery_command_offers_the_pool_without_a_user_import():
    out = subprocess.run([sys.executable, "-m", "celery", "worker", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "asyncsql" in out


def test_the_cli_plugin_does_not_import_sqlalchemy():
    code = "import sys, celery_asyncpool.cli; print('sqlalchemy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _BuildingWorker:
    """What a WorkController holds once the Pool bootstep's ``__init__`` ran."""

    def __init__(self, **attrs):
        self.pool = None
        self.__dict__.update(attrs)


def test_the_pool_learns_the_autoscale_maximum_of_the_worker_being_built():
    from celery import signals

    registration.register()
    worker = _BuildingWorker(autoscale=[8, 2], max_concurrency=8, min_concurrency=2)
    signals.worker_init.send(sender=worker)
    assert registration.autoscale_maximum(2) == 8
    worker.pool = object()
    assert registration.autoscale_maximum(2) is None, "a pool already built: not ours"
    without_autoscale = _BuildingWorker(autoscale=None, max_concurrency=None)
    signals.worker_init.send(sender=without_autoscale)
    assert registration.autoscale_maximum(4) is None


def test_a_celery_without_max_concurrency_falls_back_loudly(caplog):
    from celery import signals

    registration.register()
    moved = _BuildingWorker(autoscale=[8, 2])  # held: the receiver keeps a weak reference
    signals.worker_init.send(sender=moved)
    assert registration.autoscale_maximum(2) is None
    assert "children are laid out for 2 slot(s) only" in caplog.text


class _State:
    """What a control command gets: the worker's consumer state, with its app."""

    def __init__(self, conf):
        from celery import Celery

        self.app = Celery("masked", set_as_current=False)
        self.app.conf.update(conf)


def test_inspect_conf_and_report_hide_passwords_of_urls_nested_in_our_settings():
    from celery import signals
    from celery.worker import control

    registration.register()
    signals.worker_init.send(sender=None)
    signals.worker_init.send(sender=None)  # a second worker in the process wraps nothing twice
    state = _State({"asyncsql_databases": {"reports": "postgresql+asyncpg://u:pw-1@h/db",
                                           "archive": {"url": "postgresql+asyncpg://u:pw-2@h/a"}}})
    conf = control.Panel.data["conf"](state)
    report = control.Panel.data["report"](state)["ok"]
    assert conf["asyncsql_databases"] == {"reports": "postgresql+asyncpg://u:***@h/db",
                                          "archive": {"url": "postgresql+asyncpg://u:***@h/a"}}
    assert "u:***@h/db" in report and "pw-1" not in report and "pw-2" not in report
    assert not getattr(control.Panel.data["conf"].__wrapped__, "masks_urls", False)


def test_a_celery_without_the_conf_command_fails_loudly(monkeypatch):
    from celery.worker import control

    monkeypatch.delitem(control.Panel.data, "conf")
    with pytest.raises(AsyncPoolError, match="no longer registers the `conf` inspect command"):
        registration._mask_inspect_replies()


@pytest.mark.parametrize("path", [
    "celery_asyncpool.pool:TaskPool",  # worker_pool = "celery_asyncpool.pool:TaskPool"
    "celery_asyncpool.cli:asyncsql",  # the celery.commands entry point
    "celery_asyncpool.retry:DATABASE_ERRORS",
    *(f"celery_asyncpool:{name}" for name in celery_asyncpool.__all__),
])
def test_every_public_path_still_imports(path):
    import importlib

    module, name = path.split(":")
    assert getattr(importlib.import_module(module), name) is not None


def test_the_entry_points_name_what_the_package_ships():
    from importlib.metadata import entry_points

    found = {(ep.group, ep.name): ep.value for group in ("celery.commands", "pytest11")
             for ep in entry_points(group=group) if ep.value.startswith("celery_asyncpool")}
    assert found == {("celery.commands", "asyncsql"): "celery_asyncpool.cli:asyncsql",
                     ("pytest11", "asyncsql"): "celery_asyncpool.pytest_plugin"}
    import celery_asyncpool.pytest_plugin  # noqa: F401


def test_the_pool_reports_the_path_users_configure():
    from celery import Celery

    pool = celery_asyncpool.TaskPool(2, app=Celery("paths", set_as_current=False))
    assert pool.info["implementation"] == "celery_asyncpool.pool:TaskPool"
