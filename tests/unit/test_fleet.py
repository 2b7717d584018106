"""The fleet's budget: what workers advertise in ``inspect stats``, added up per server."""

from celery_asyncpool.databases import fleet
from celery_asyncpool.databases.budget import ServerLimit


class Inspect:
    def __init__(self, replies):
        self.replies = replies

    def stats(self):
        return self.replies


class App:
    """What ``advertised`` reads of an app: the replies of ``control.inspect().stats()``."""

    def __init__(self, replies):
        self.control = self
        self._replies = replies

    def inspect(self, timeout, connection=None):
        return Inspect(self._replies)


def stats(budget):
    return {"pool": {"asyncsql": {fleet.BUDGET_KEY: budget}}}


def test_only_asyncsql_workers_other_than_this_one_are_peers():
    replies = {"a@h1": stats({"db:5432": 40}), "me@h3": stats({"db:5432": 40}),
               "prefork@h2": {"pool": {"max-concurrency": 4}}, "odd@h4": "not a dict"}
    assert fleet.advertised(App(replies), "me@h3") == {"a@h1": {"db:5432": 40}}
    assert fleet.advertised(App(None), "me@h3") == {}


def test_a_server_the_fleet_overfills_is_named_with_each_workers_share():
    peers = {"a@h1": {"db:5432": 40, "other:5432": 90}, "b@h2": {"db:5432": 40}}
    limits = {"db:5432": ServerLimit(100, 3), "other:5432": ServerLimit(100, 3)}
    [problem] = fleet.over_limits("this worker c@h3", {"db:5432": 20}, peers, limits)
    assert problem.startswith("Server db:5432: the fleet may open 100 connections (a@h1 40, "
                              "b@h2 40; this worker c@h3 20), above the 97 it takes from roles "
                              "that are not superusers (max_connections 100 less 3 reserved).")
    assert fleet.over_limits("me", {"db:5432": 17}, peers, limits) == []  # 97 fit


def test_a_pooled_or_unknown_server_or_a_worker_alone_is_not_judged_by_the_fleet():
    peers = {"a@h1": {"db:5432": 90}}
    assert fleet.over_limits("me", {"db:5432": 50}, peers,
                             {"db:5432": ServerLimit(100, 3, pooled=True)}) == []
    assert fleet.over_limits("me", {"db:5432": 50}, peers, {}) == []
    assert fleet.over_limits("me", {"db:5432": 500}, {}, {"db:5432": ServerLimit(100, 3)}) == []
