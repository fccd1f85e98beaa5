"""The token charge spool (proxy/chargespool.py): its file format and edges, and its replay
(proxy/chargebacklog.py, tokenstore.replay_charges) into the real database, exactly once.
The gateway-level story (an outage, a SIGTERM, a restart) is in test_faults_tokens.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import asyncpg
import pytest
from gatewayhelpers import wait_until

from proxy import tokenstore
from proxy.chargebacklog import ChargeBacklog
from proxy.chargespool import ChargeBatch, ChargeSpool, charge_spool_path, encode_batch
from proxy.tokenlimit import TokenLimiter

pytest_plugins = ["gatewayfixture"]

DAY = date(2026, 11, 30)
MIB = 2**20


def batch(*charges: tuple[str, int], at: float = 1_790_000_000.0, day: date = DAY) -> ChargeBatch:
    return ChargeBatch.new(at, {(user, day): tokens for user, tokens in charges})


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[ChargeSpool]:
    spool = ChargeSpool(tmp_path / "spool" / "requests.charges.jsonl", MIB)
    yield spool
    spool.close()


def test_the_charge_spool_sits_beside_the_request_spool_under_its_own_name() -> None:
    path = charge_spool_path(Path("/srv/run/spool/llama_requests.jsonl"))

    assert path == Path("/srv/run/spool/llama_requests.charges.jsonl")


@pytest.mark.asyncio
async def test_batches_come_back_oldest_first_and_a_full_commit_removes_the_files(
    spool: ChargeSpool,
) -> None:
    first, second = batch(("alice", 12)), batch(("bob", 5), ("carol", 7))
    assert await spool.append(first) and await spool.append(second)

    chunk = await spool.read_chunk(10)

    assert chunk.batches == [first, second]
    assert spool.path.stat().st_mode & 0o777 == 0o600
    assert spool.path.parent.stat().st_mode & 0o777 == 0o700
    assert await spool.commit(chunk.end) is True
    assert not spool.path.exists() and not spool.offset_path.exists()


@pytest.mark.asyncio
async def test_a_torn_last_line_is_skipped_alone_and_the_next_batch_survives(
    spool: ChargeSpool, caplog
) -> None:
    kept, torn, after = batch(("alice", 1)), batch(("alice", 2)), batch(("alice", 3))
    await spool.append(kept)
    with open(spool.path, "ab") as file:  # a crash in the middle of a write
        file.write(encode_batch(torn)[:25])
    await spool.append(after)

    with caplog.at_level(logging.WARNING):
        chunk = await spool.read_chunk(10)

    assert chunk.batches == [kept, after]
    assert "skipping an unreadable charge spool line" in caplog.text


@pytest.mark.asyncio
async def test_a_torn_line_at_the_very_end_is_not_read_as_a_batch(
    spool: ChargeSpool, caplog
) -> None:
    kept = batch(("alice", 1))
    await spool.append(kept)
    with open(spool.path, "ab") as file:
        file.write(encode_batch(batch(("alice", 2)))[:-1])  # all but its newline

    with caplog.at_level(logging.WARNING):
        chunk = await spool.read_chunk(10)

    assert chunk.batches == [kept]
    assert "skipping a torn charge spool line" in caplog.text
    assert chunk.end == spool.path.stat().st_size  # consumed: it will not come back


@pytest.mark.asyncio
async def test_a_batch_over_the_size_cap_is_refused_and_the_file_is_unchanged(
    tmp_path: Path,
) -> None:
    spool = ChargeSpool(tmp_path / "charges.jsonl", 200)
    try:
        assert await spool.append(batch(("alice", 1)))
        size = spool.path.stat().st_size

        assert not await spool.append(batch(*((f"user{n}", n + 1) for n in range(20))))
        assert spool.path.stat().st_size == size
    finally:
        spool.close()


@pytest.mark.asyncio
async def test_a_partial_commit_resumes_after_its_offset_in_a_new_process(
    spool: ChargeSpool,
) -> None:
    batches = [batch(("alice", n + 1)) for n in range(3)]
    for each in batches:
        await spool.append(each)
    first = await spool.read_chunk(1)
    assert await spool.commit(first.end) is False

    reopened = ChargeSpool(spool.path, MIB)
    try:
        rest = await reopened.read_chunk(10)
    finally:
        reopened.close()

    assert first.batches == batches[:1] and rest.batches == batches[1:]


@pytest.mark.asyncio
async def test_a_batch_replayed_twice_is_counted_once(db: asyncpg.Pool) -> None:
    charged = batch(("alice", 12), ("bob", 3))

    first = await tokenstore.replay_charges(db, [charged], 60.0, "gw")
    again = await tokenstore.replay_charges(db, [charged], 60.0, "gw")

    assert (first, again) == (1, 0)
    assert await day_totals(db) == {("alice", DAY): 12, ("bob", DAY): 3}


@pytest.mark.asyncio
async def test_a_crash_between_the_replay_and_its_offset_does_not_count_twice(
    db: asyncpg.Pool, spool: ChargeSpool
) -> None:
    first, second = batch(("alice", 10)), batch(("alice", 20))
    await spool.append(first)
    await spool.append(second)
    # The gateway that crashed: its chunk reached the database, its offset did not.
    await tokenstore.replay_charges(db, [first, second], 60.0, "gw")
    await spool.append(batch(("alice", 30)))

    backlog = make_backlog(db, spool)
    assert await backlog.has_pending()
    assert await backlog.replay() is True

    assert await day_totals(db) == {("alice", DAY): 60}
    assert not spool.path.exists()
    assert await db.fetchval("SELECT count(*) FROM token_charge_replays") == 0


@pytest.mark.asyncio
async def test_replayed_charges_join_the_minute_window_only_while_inside_it(
    db: asyncpg.Pool,
) -> None:
    now = time.time()
    today = datetime.fromtimestamp(now, UTC).date()
    recent = batch(("alice", 7), at=now - 5, day=today)
    old = batch(("alice", 100), at=now - 3600, day=today)

    await tokenstore.replay_charges(db, [old, recent], 60.0, "gw")
    [usage] = await tokenstore.charge_tokens(db, ["alice"], [0], [today], 60.0, "reader")

    assert usage.counts == (7,)
    assert abs(usage.stamps[0] - (now - 5)) < 1
    assert (usage.day_used, usage.month_used) == (107, 107)


class Outage:
    """The real llamagate_charge_tokens behind a switch that fails it as an outage would."""

    def __init__(self, db: asyncpg.Pool) -> None:
        self.db = db
        self.is_down = False

    async def __call__(self, *batch) -> list[tokenstore.TokenUsage]:
        if self.is_down:
            raise ConnectionRefusedError("database down")
        return await tokenstore.charge_tokens(self.db, *batch)


@pytest.mark.asyncio
async def test_charges_the_database_fails_are_parked_and_replayed_once_by_the_next_gateway(
    db: asyncpg.Pool, spool: ChargeSpool
) -> None:
    outage = Outage(db)
    outage.is_down = True
    stopped = TokenLimiter(outage)
    stopped.backlog = make_backlog(db, spool)
    stopped.charge("alice", 10)
    await stopped.flush()
    assert not stopped.charges and spool.path.exists()  # on disk, not in memory
    stopped.charge("alice", 5)
    await stopped.close()  # the database still down: parked too
    assert not stopped.charges

    outage.is_down = False
    restarted = TokenLimiter(outage)
    restarted.backlog = make_backlog(db, ChargeSpool(spool.path, MIB))
    restarted.charge("alice", 1)
    reading = asyncio.create_task(restarted.read("alice"))  # waits for the next flush
    await wait_until(lambda: restarted.waiters, "the read to wait for a flush")
    await restarted.flush()
    view = await asyncio.wait_for(reading, 10)
    await restarted.close()

    assert view.day_used == 16  # the parked charges before the new one, each once
    assert not spool.path.exists()
    assert await db.fetchval("SELECT sum(tokens) FROM token_days") == 16


@pytest.mark.asyncio
async def test_charges_that_do_not_fit_the_spool_wait_in_memory_instead_of_being_lost(
    db: asyncpg.Pool, tmp_path: Path
) -> None:
    outage = Outage(db)
    outage.is_down = True
    limiter = TokenLimiter(outage)
    full = ChargeSpool(tmp_path / "charges.jsonl", 10)  # smaller than any line
    limiter.backlog = make_backlog(db, full)
    limiter.charge("alice", 10)
    await limiter.flush()
    assert dict(limiter.charges) == {("alice", datetime.now(UTC).date()): 10}
    assert "is full" in limiter.backlog.error

    outage.is_down = False
    await limiter.flush()
    await limiter.close()

    assert not limiter.charges
    assert limiter.backlog.error is None  # /readyz is ok again once they are written
    assert await db.fetchval("SELECT sum(tokens) FROM token_days") == 10


def make_backlog(db: asyncpg.Pool, spool: ChargeSpool) -> ChargeBacklog:
    return ChargeBacklog(
        spool,
        lambda batches: tokenstore.replay_charges(db, batches, 60.0, "gw"),
        lambda ids: tokenstore.forget_replays(db, ids),
    )


async def day_totals(db: asyncpg.Pool) -> dict[tuple[str, date], int]:
    rows = await db.fetch("SELECT username, day, tokens FROM token_days")
    return {(row["username"], row["day"]): row["tokens"] for row in rows}
