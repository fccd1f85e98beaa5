"""What a database error means: the database is unavailable, the data is bad, or other.

One place decides it, by SQLSTATE class, so that auth, the limiter and the request log
take the outage path on the same errors. "Unavailable" means: try again later, the
rows or keys are fine (connection lost or refused, server shutting down or out of
resources, a query cancelled or timed out, a read-only standby). Only data errors
(classes 22 and 23) mean that the same rows will be refused for ever. The limiters also
announce an outage's start and end here, in the same words.
"""

from __future__ import annotations

import enum
import logging

import asyncpg

# SQLSTATE classes: 08 connection exception, 53 insufficient resources, 57 operator
# intervention (shutdown, query cancelled), 58 system error (I/O); 25006 read-only
# transaction, as on a standby after a failover.
UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})
UNAVAILABLE_STATES = frozenset({"25006"})
DATA_CLASSES = frozenset({"22", "23"})

# The same, as exception classes for `except`: asyncpg's class bases follow SQLSTATE.
# OSError and TimeoutError: a refused or lost socket, a connect, acquire or command
# timeout. InterfaceError: asyncpg's own "connection is closed" and the like.
# InternalClientError: a server that ends its sessions (a stop or restart) sends the
# error before closing the socket, and a query sent in between finds the connection
# half-way through that error ("cannot switch to state 12"): the same lost connection.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.PostgresSystemError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


class Failure(enum.Enum):
    """How a failed database call should be treated."""

    UNAVAILABLE = "unavailable"  # retry later; take the outage path meanwhile
    DATA = "data"  # these rows will never be accepted: set them aside
    OTHER = "other"  # a bug or a schema problem: keep the rows, report it, retry later


def classify(error: BaseException) -> Failure:
    """Unavailable, bad data, or other, from the error's SQLSTATE (or its Python type)."""
    # asyncpg's client-side DataError (a value it cannot encode) is an InterfaceError
    # and a ValueError: test it first, or bad rows would be retried for ever.
    if isinstance(error, asyncpg.exceptions.InterfaceError) and isinstance(error, ValueError):
        return Failure.DATA
    sqlstate = getattr(error, "sqlstate", None) or ""
    if sqlstate[:2] in DATA_CLASSES:
        return Failure.DATA
    if sqlstate[:2] in UNAVAILABLE_CLASSES or sqlstate in UNAVAILABLE_STATES:
        return Failure.UNAVAILABLE
    if isinstance(error, UNAVAILABLE_ERRORS):
        return Failure.UNAVAILABLE
    return Failure.OTHER


def log_limiter_database(
    log: logging.Logger, what: str, was_down: bool, is_down: bool, error: BaseException | None
) -> None:
    """One warning when a limiter loses the database and one when it is back, not one a call."""
    if is_down and not was_down:
        log.warning(
            "%s: database unreachable (%s); counting per gateway until it returns",
            what,
            type(error).__name__,
        )
    elif not is_down and was_down:
        log.warning("%s: database is back; counting across gateways again", what)
