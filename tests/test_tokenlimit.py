"""The token limiter's logic (proxy/tokenlimit.py) with a stand-in for the database's
function, on an injected clock: when it asks the database, and what it does without one.
Exactness across gateways on the real database is in test_gateway_tokenlimit.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

import pytest
import pytest_asyncio

from proxy.tokenbudget import TokenLimits
from proxy.tokenlimit import TokenLimiter
from proxy.tokenstore import TokenUsage

TPM = TokenLimits(per_minute=100)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_790_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeDatabase:
    """llamagate_charge_tokens in memory; `is_down` makes every call fail as an outage."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.charges: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.days: dict[tuple[str, object], int] = defaultdict(int)
        self.calls: list[list[tuple[str, int]]] = []
        self.is_down = False

    async def __call__(self, users, tokens, days, window, gateway_id) -> list[TokenUsage]:
        self.calls.append(list(zip(users, tokens, strict=True)))
        if self.is_down:
            raise ConnectionRefusedError("database down")
        now = self.clock()
        answers = []
        for user, count, day in zip(users, tokens, days, strict=True):
            if count:
                self.charges[user].append((now, count))
                self.days[(user, day)] += count
            live = [(s, c) for s, c in self.charges[user] if s > now - window]
            stamps, counts = tuple(s for s, _ in live), tuple(c for _, c in live)
            used = self.days[(user, day)]
            answers.append(TokenUsage(user, day, stamps, counts, used, used, now))
        return answers


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def database(clock: FakeClock) -> FakeDatabase:
    return FakeDatabase(clock)


@pytest_asyncio.fixture
async def start_limiter(database: FakeDatabase, clock: FakeClock):
    """Make a limiter with its flusher running, as the gateway runs it."""
    tasks = []

    def start(is_listening: bool = True) -> TokenLimiter:
        limiter = TokenLimiter(database, clock=clock)
        limiter.FLUSH_SECONDS = 3600  # background flushes only when the test calls flush()
        if is_listening:
            limiter.start_listening()
        tasks.append(asyncio.create_task(limiter.run()))
        return limiter

    yield start
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def serve(limiter: TokenLimiter, tokens: int = 10, user: str = "alice") -> bool:
    """One request: admission, then its charge, as the gateway does them."""
    decision = await limiter.admit(user, TPM)
    if decision.is_allowed:
        written = limiter.charge(user, tokens)
        if written is not None:
            await written
    return decision.is_allowed


@pytest.mark.asyncio
async def test_a_user_of_this_gateway_alone_is_admitted_without_a_round_trip(
    start_limiter, database
):
    limiter = start_limiter()
    assert await serve(limiter)  # first sight: a read, and a charge written at once
    assert len(database.calls) == 2
    for _ in range(8):
        assert await serve(limiter)
    assert len(database.calls) == 2, "admissions or charges went to the database"
    assert await serve(limiter)  # 90 used: admitted, and 100 after it
    assert not await serve(limiter)
    await limiter.flush()  # the background flush
    assert sum(database.days.values()) == 100


@pytest.mark.asyncio
async def test_a_user_another_gateway_charged_is_asked_about_each_time(start_limiter, database):
    limiter = start_limiter()
    assert await serve(limiter)
    limiter.note_foreign_charge("another-gateway alice")
    before = len(database.calls)
    for _ in range(3):
        assert await serve(limiter)
    # Each admission read the database, and each charge was written before it returned.
    assert len(database.calls) == before + 6
    limiter.note_foreign_charge(f"{limiter.gateway_id} bob")  # our own: ignored
    assert "bob" not in limiter.foreign_at


@pytest.mark.asyncio
async def test_without_notifications_every_user_counts_as_shared(start_limiter, database):
    limiter = start_limiter(is_listening=False)
    for _ in range(3):
        assert await serve(limiter)
    assert len(database.calls) == 6


@pytest.mark.asyncio
async def test_without_the_database_a_gateway_counts_alone_and_writes_its_charges_later(
    start_limiter, database, clock
):
    limiter = start_limiter()
    database.is_down = True
    admitted = [await serve(limiter, tokens=30) for _ in range(5)]
    assert admitted == [True, True, True, True, False]  # 0, 30, 60, 90 < 100; 120
    assert limiter.is_database_down
    tries = len(database.calls)
    assert tries <= 2, "each request waited for the dead database"
    clock.now += TokenLimiter.RETRY_SECONDS
    database.is_down = False
    await limiter.flush()
    assert database.days and sum(database.days.values()) == 120
    assert not limiter.is_database_down


@pytest.mark.asyncio
async def test_shutdown_does_not_wait_for_a_stalled_database(clock, monkeypatch):
    monkeypatch.setattr("proxy.tokenlimit.CLOSE_SECONDS", 0.05)
    never = asyncio.Event()

    async def stalled(*_batch):
        await never.wait()

    limiter = TokenLimiter(stalled, clock=clock)
    limiter.charge("alice", 10)
    await asyncio.wait_for(limiter.close(), 3)
    assert sum(limiter.charges.values()) == 10  # kept, not lost silently: logged at close
