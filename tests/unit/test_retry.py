"""DATABASE_ERRORS holds every kind of error a database outage raises in a task body."""

import socket

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, OperationalError

from celery_asyncpool.retry import DATABASE_ERRORS


@pytest.mark.parametrize("error", [
    DBAPIError("SELECT 1", None, Exception("connection was closed in the middle of operation")),
    OperationalError("SELECT 1", None, Exception("server closed the connection")),
    ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"),
    ConnectionResetError(104, "Connect call failed ('127.0.0.1', 5432)"),
    socket.gaierror(-2, "Name or service not known"),
    TimeoutError(),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
], ids=lambda error: type(error).__name__)
def test_an_outage_is_caught_whichever_way_it_is_raised(error):
    assert isinstance(error, DATABASE_ERRORS)


def test_errors_of_the_task_itself_are_not_database_errors():
    assert not isinstance(KeyError("user"), DATABASE_ERRORS)
    assert not isinstance(ValueError(), DATABASE_ERRORS)
