"""The connection budget: our pools plus a database result backend, summed per server."""

import pytest

from celery_asyncpool.databases.budget import Entry, connection_budget, over_max_connections, \
    result_backend_url
from celery_asyncpool.config import Settings
from celery_asyncpool.databases.engines import Sizing

PG = "postgresql+psycopg://app:s3cret@db:5432/app"


@pytest.mark.parametrize("conf,url", [
    ({"result_backend": f"db+{PG}"}, PG),
    ({"result_backend": "database", "database_url": PG}, PG),
    ({"result_backend": "redis://localhost/1"}, None),
    ({"result_backend": None}, None),
    ({}, None),
])
def test_only_celerys_database_backend_is_counted(conf, url):
    assert result_backend_url(conf) == url


def test_the_backend_adds_two_per_child_and_two_in_the_parent_with_its_password_masked():
    settings = Settings.from_conf({"asyncsql_database_url": "postgresql+asyncpg://app@db/app"})
    budget = connection_budget({"result_backend": f"db+{PG}"}, settings, Sizing(5, 3, 80))
    assert budget == (
        Entry("default", "postgresql+asyncpg://app@db/app", "db:5432", 15),
        Entry("result-backend", "postgresql+psycopg://app:***@db:5432/app", "db:5432", 8))


def test_budgets_on_one_server_add_up_and_other_servers_stand_alone():
    budget = (Entry("default", "u1", "db:5432", 60), Entry("result-backend", "u2", "db:5432", 50),
              Entry("reports", "u3", "other:5432", 60))
    assert over_max_connections(budget, {"db:5432": 100, "other:5432": 100}) == [
        "Server db:5432 ('default' 60, 'result-backend' 50): the worker may open 110 "
        "connections, above the server's max_connections (100); lower -c or "
        "asyncsql_connection_cap."]
    assert over_max_connections(budget, {"other:5432": 50}) == [
        "Database 'reports': the worker may open 60 connections, above the server's "
        "max_connections (50); lower -c or asyncsql_connection_cap."]
