"""The request log's spool: torn lines, private files, the size cap, append-only outages."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from proxy.requestlog import PROBE_INTERVAL_SECONDS, RequestLog, RequestRecord
from proxy.spool import Spool, append_lines


def make_rows(count: int, first: int = 0) -> list[tuple]:
    return [
        RequestRecord(
            f"request-{number}",
            datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=number),
            "POST",
            "/v1/chat/completions",
            "127.0.0.1",
            0.0,
            status_code=200,
            username="alice",
        ).to_row(0.5)
        for number in range(first, first + count)
    ]


async def spooled(spool: Spool) -> list[tuple]:
    return (await spool.read_chunk(1_000_000)).rows


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingDatabase:
    """An insert and a probe that fail while `is_down`; counts every call."""

    def __init__(self) -> None:
        self.is_down = False
        self.inserts = 0
        self.probes = 0
        self.rows: list[tuple] = []

    async def insert(self, rows) -> None:
        self.inserts += 1
        if self.is_down:
            raise ConnectionRefusedError(111, "Connection refused")
        self.rows.extend(rows)

    async def probe(self) -> None:
        self.probes += 1
        if self.is_down:
            raise ConnectionRefusedError(111, "Connection refused")


@pytest.mark.asyncio
async def test_a_line_torn_by_a_crash_loses_no_other_row(tmp_path):
    spool = Spool(tmp_path / "requests.spool")
    before, after = make_rows(2), make_rows(2, first=10)
    await spool.append(before)
    with open(spool.path, "a", encoding="utf-8") as torn:
        torn.write('["request-9", "2026-01-01T00:0')  # the gateway died mid-write
    restarted = Spool(spool.path)  # the next gateway appends behind the torn line
    await restarted.append(after)
    assert await spooled(restarted) == before + after


@pytest.mark.asyncio
async def test_spool_files_are_private_in_a_private_directory(tmp_path):
    spool = Spool(tmp_path / "spool" / "requests.spool")
    await spool.append(make_rows(3))
    await spool.set_aside(make_rows(1))
    chunk = await spool.read_chunk(1)
    await spool.commit(chunk.end)  # writes the offset file
    for path in (spool.path, spool.rejected_path, spool.offset_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(spool.path.parent.stat().st_mode) == 0o700
    spool.close()


def test_an_existing_wider_spool_file_is_narrowed_to_0600(tmp_path):
    path = tmp_path / "requests.spool"
    path.write_text("")
    path.chmod(0o644)
    append_lines(path, make_rows(1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_spool_pointed_at_a_device_leaves_the_device_as_it_was(tmp_path):
    # The full-disk tests point spools at /dev/full; narrowing it to 0600 would change
    # the host for every other user of the device.
    device = "/dev/full"
    mode = stat.S_IMODE(os.stat(device).st_mode)
    path = tmp_path / "requests.spool"
    path.symlink_to(device)
    try:
        with pytest.raises(OSError):  # ENOSPC: the disk is "full"
            append_lines(path, make_rows(1))
        assert stat.S_IMODE(os.stat(device).st_mode) == mode
    finally:
        os.chmod(device, mode)


@pytest.mark.asyncio
async def test_rows_over_the_size_cap_are_dropped_counted_and_reported(tmp_path):
    append_lines(tmp_path / "measure", make_rows(1))
    one_row = (tmp_path / "measure").stat().st_size
    spool = Spool(tmp_path / "requests.spool", max_bytes=3 * one_row + one_row // 2)
    database, counted = CountingDatabase(), []
    database.is_down = True
    journal = RequestLog(database.insert, spool, on_dropped=counted.append)
    for row in make_rows(5):
        journal.add(row)
    await journal.flush()
    assert await spooled(spool) == make_rows(3)
    assert journal.dropped == 2 and sum(counted) == 2
    assert "LLAMA_PROXY_SPOOL_MAX_MB" in journal.problem and "2 rows dropped" in journal.problem
    spool.close()


@pytest.mark.asyncio
async def test_while_the_database_is_down_rows_are_only_appended_until_a_probe_answers(tmp_path):
    database, clock = CountingDatabase(), Clock()
    spool = Spool(tmp_path / "requests.spool")
    journal = RequestLog(database.insert, spool, probe=database.probe, clock=clock)
    rows = make_rows(6)
    database.is_down = True
    journal.add(rows[0])
    await journal.flush()  # the insert fails: the database is known to be down
    assert (database.inserts, database.probes) == (1, 0)
    for row in rows[1:4]:
        journal.add(row)
        await journal.flush()  # within the probe interval: appended, nothing tried
    assert (database.inserts, database.probes) == (1, 0)
    clock.now += PROBE_INTERVAL_SECONDS
    journal.add(rows[4])
    await journal.flush()  # the probe is due; it fails, so the rows are not tried
    assert (database.inserts, database.probes) == (1, 1)
    assert await spooled(spool) == rows[:5]
    database.is_down = False
    clock.now += PROBE_INTERVAL_SECONDS
    journal.add(rows[5])
    await journal.flush()  # the probe answers: the spool is replayed, then the new row
    assert database.rows == rows
    assert not spool.path.exists()
    spool.close()


@pytest.mark.asyncio
async def test_a_read_only_database_keeps_rows_for_later_instead_of_rejecting_them(tmp_path):
    # 25006, as a standby answers after a failover: unavailable, not bad data.
    async def insert(rows) -> None:
        raise asyncpg.exceptions.ReadOnlySQLTransactionError("read-only transaction")

    spool = Spool(tmp_path / "requests.spool")
    journal = RequestLog(insert, spool)
    journal.add(make_rows(1)[0])
    await journal.flush()
    assert journal.is_database_down
    assert await spooled(spool) == make_rows(1)
    assert not spool.rejected_path.exists()
    spool.close()
