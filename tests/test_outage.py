"""What counts as "the database is unavailable": SQLSTATE classes, in one pure function."""

from __future__ import annotations

import inspect

import asyncpg
import pytest

from proxy.outage import UNAVAILABLE_ERRORS, Failure, classify

# What asyncpg raises when it cannot encode a value, before anything reaches the server.
ClientDataError = asyncpg.exceptions._base.DataError


def with_sqlstate(code: str) -> asyncpg.PostgresError:
    """A server error as asyncpg reports a SQLSTATE it has no class of its own for."""
    error = asyncpg.PostgresError("from a newer server")
    error.sqlstate = code
    return error


SERVER_ERRORS = [
    cls
    for _name, cls in inspect.getmembers(asyncpg.exceptions, inspect.isclass)
    if issubclass(cls, asyncpg.PostgresError) and len(getattr(cls, "sqlstate", "") or "") == 5
]


@pytest.mark.parametrize(
    ("error", "failure"),
    [
        (asyncpg.exceptions.ConnectionFailureError("gone"), Failure.UNAVAILABLE),  # 08006
        (asyncpg.exceptions.TooManyConnectionsError("full"), Failure.UNAVAILABLE),  # 53300
        (asyncpg.exceptions.DiskFullError("disk"), Failure.UNAVAILABLE),  # 53100
        (asyncpg.exceptions.QueryCanceledError("lock wait"), Failure.UNAVAILABLE),  # 57014
        (asyncpg.exceptions.AdminShutdownError("bye"), Failure.UNAVAILABLE),  # 57P01
        (asyncpg.exceptions.PostgresIOError("io"), Failure.UNAVAILABLE),  # 58030
        (asyncpg.exceptions.ReadOnlySQLTransactionError("standby"), Failure.UNAVAILABLE),
        (TimeoutError(), Failure.UNAVAILABLE),  # command_timeout, acquire timeout
        (ConnectionRefusedError(111, "refused"), Failure.UNAVAILABLE),
        (asyncpg.exceptions.InterfaceError("connection is closed"), Failure.UNAVAILABLE),
        # A query sent between a stopping server's error and its closing the socket.
        (
            asyncpg.exceptions.InternalClientError("cannot switch to state 12"),
            Failure.UNAVAILABLE,
        ),
        (asyncpg.exceptions.CheckViolationError("check"), Failure.DATA),  # 23514
        (asyncpg.exceptions.UniqueViolationError("dup"), Failure.DATA),  # 23505
        (asyncpg.exceptions.NumericValueOutOfRangeError("big"), Failure.DATA),  # 22003
        (asyncpg.exceptions.DataError("bad value"), Failure.DATA),  # 22000
        (ClientDataError("invalid input for query argument $1"), Failure.DATA),
        (with_sqlstate("57P99"), Failure.UNAVAILABLE),  # codes asyncpg has no class for
        (with_sqlstate("53999"), Failure.UNAVAILABLE),
        (with_sqlstate("22999"), Failure.DATA),
        (with_sqlstate("25006"), Failure.UNAVAILABLE),
        (with_sqlstate("25001"), Failure.OTHER),
        (asyncpg.exceptions.InFailedSQLTransactionError("aborted"), Failure.OTHER),  # 25P02
        (asyncpg.exceptions.UndefinedTableError("no table"), Failure.OTHER),  # 42P01
        (asyncpg.exceptions.InsufficientPrivilegeError("denied"), Failure.OTHER),  # 42501
        (ValueError("a bug"), Failure.OTHER),
    ],
)
def test_errors_are_classified_by_sqlstate_class(error, failure):
    assert classify(error) is failure


@pytest.mark.parametrize("cls", SERVER_ERRORS, ids=lambda cls: f"{cls.sqlstate}-{cls.__name__}")
def test_the_except_tuple_agrees_with_classify_for_every_server_error(cls):
    error = cls("x")
    is_unavailable = cls.sqlstate[:2] in {"08", "53", "57", "58"} or cls.sqlstate == "25006"
    assert (classify(error) is Failure.UNAVAILABLE) == is_unavailable
    assert isinstance(error, UNAVAILABLE_ERRORS) == is_unavailable
