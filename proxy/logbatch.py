"""Request-log rows as one JSON text: what a batch insert sends (proxy/store.py).

asyncpg encoding a batch of ~150 rows of 18 columns as 18 typed arrays took one
event-loop step of 2-3 ms of CPU on the 2-core box, five times a second: it held up
whichever request was in flight, and set the gateway's added p99 at one connection.
Here the rows become one JSON array of arrays, a slice of rows at a time with a yield to
the event loop in between, so no step of the flush costs more than about half a
millisecond; asyncpg then only copies one text parameter, and PostgreSQL takes it apart
(jsonb_array_elements) into the same columns and types as before.

Values are written exactly as asyncpg would have sent them: text unchanged (non-ASCII
raw, so that it needs no escape decoding), floats by their shortest round-tripping repr
(NaN and infinities as the strings float8 takes), times with their offset (a naive one is
taken as local time, as asyncpg does).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring  # C; keeps non-ASCII as it is

# Rows encoded between two yields: about 20 us a row on the 2-core box, so ~0.4 ms a slice.
ENCODE_SLICE_ROWS = 20


async def encode_batch(rows: Sequence[Sequence[object]]) -> str:
    """A JSON array of the rows, each a JSON array; yields every ENCODE_SLICE_ROWS rows."""
    encoded: list[str] = []
    for start in range(0, len(rows), ENCODE_SLICE_ROWS):
        if start:
            await asyncio.sleep(0)
        encoded.extend(map(encode_row, rows[start : start + ENCODE_SLICE_ROWS]))
    return "[" + ",".join(encoded) + "]"


def encode_row(row: Sequence[object]) -> str:
    """One row as a JSON array, for PostgreSQL's ->> and a cast to the column's type."""
    return "[" + ",".join(map(_encode_value, row)) + "]"


def _encode_value(value: object) -> str:
    # Exact types first: bool is an int, and the common cases should be cheap.
    kind = type(value)
    if kind is str:
        return encode_basestring(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return repr(value) if math.isfinite(value) else f'"{value!r}"'
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.astimezone(UTC)
        return f'"{value.isoformat()}"'
    for base in (str, int, float):  # a subclass, an IntEnum say (bool has none)
        if isinstance(value, base):
            return _encode_value(base(value))
    raise TypeError(f"cannot write a {kind.__name__} to the request log: {value!r}")
