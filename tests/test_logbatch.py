"""Encoding request-log rows for the batch insert (proxy/logbatch.py); the round trip
through PostgreSQL is in test_store.py."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest

from proxy import logbatch


def make_row(number: int) -> tuple:
    return (f"r-{number}", datetime(2026, 1, 1, tzinfo=UTC), "alice", None, "POST", "/",
            200, 1.5, None, 10, 20, "m", True, 1, 2, "::1", None, 1)  # fmt: skip


@pytest.mark.asyncio
async def test_a_batch_is_encoded_in_slices_with_the_event_loop_free_in_between():
    """The flush must not be one long event-loop step: requests get their turn between
    slices of rows (the step of a whole batch set the gateway's added p99)."""
    slices = 10
    rows = [make_row(n) for n in range(slices * logbatch.ENCODE_SLICE_ROWS)]
    turns = 0
    is_done = False

    async def other_task() -> None:
        nonlocal turns
        while not is_done:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)  # let it start
    started_with = turns
    batch = await logbatch.encode_batch(rows)
    is_done = True
    await other
    # The encoding does no I/O: every turn the other task had, it had between slices.
    assert turns - started_with >= slices - 1
    assert [row[0] for row in json.loads(batch)] == [row[0] for row in rows]


def test_a_row_is_a_json_array_in_column_order():
    row = make_row(7)
    assert json.loads(logbatch.encode_row(row)) == [
        "r-7", "2026-01-01T00:00:00+00:00", "alice", None, "POST", "/", 200, 1.5, None,
        10, 20, "m", True, 1, 2, "::1", None, 1,
    ]  # fmt: skip


def test_a_value_of_no_column_type_is_refused_by_name():
    with pytest.raises(TypeError, match="cannot write a dict to the request log"):
        logbatch.encode_row(("r-1", {"a": 1}))
