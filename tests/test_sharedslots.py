"""This gateway's lease client (proxy/sharedslots.py) on the real PostgreSQL: no shared
slot is taken once heartbeats have failed for a while, a slot that could not be given back
is given back by the first heartbeat that goes through, and the waiting mark follows the
requests that wait. The outage is a switch in front of the real pool (logic only)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime

import pytest
from gatewayhelpers import wait_until
from sharedmembers import add_member, holders

from proxy.sharedslots import SharedSlots

pytest_plugins = ["gatewayfixture"]
pytestmark = pytest.mark.asyncio


class Switch:
    """The real pool, or a refused connection while `is_down`."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.is_down = False

    def __getattr__(self, name):
        if self.is_down:
            raise ConnectionRefusedError("the database is down")
        return getattr(self.pool, name)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def waiting_since(db, gateway_id: str):
    return await db.fetchval(
        "SELECT waiting_since FROM llama_gateways WHERE gateway_id = $1", gateway_id
    )


async def test_no_slot_is_taken_after_three_seconds_of_failed_heartbeats(db):
    member = await add_member(db, "http://m:1", "m")
    switch, clock = Switch(db), Clock()
    slots = SharedSlots(switch, "gw", clock=clock)
    assert not slots.is_usable  # never heartbeaten
    await slots.beat()
    assert slots.is_usable
    switch.is_down = True
    clock.now += 2.0
    await slots.beat()
    assert slots.is_usable  # a blip: still within the 3 s
    clock.now += 1.5
    await slots.beat()
    assert not slots.is_usable
    switch.is_down = False  # the database answers, but this gateway has not said so yet
    assert await slots.take([member], is_waiter=False) is None
    await slots.beat()
    assert await slots.take([member], is_waiter=False) == (member, 0)


async def test_a_slot_not_given_back_during_an_outage_is_given_back_by_the_next_heartbeat(db):
    member = await add_member(db, "http://m:1", "m")
    switch = Switch(db)
    slots = SharedSlots(switch, "gw")
    await slots.beat()
    assert await slots.take([member], is_waiter=False) == (member, 0)
    switch.is_down = True
    await slots._give_back(member, 0, 1, 0)
    switch.is_down = False
    assert await holders(db, member) == ["gw"]  # still ours: the heartbeat keeps it alive
    await slots.beat()
    assert await holders(db, member) == [None]
    assert await db.fetchval("SELECT requests FROM llama_backend_slots") == 1


async def test_the_waiting_mark_is_set_by_the_first_waiter_and_cleared_by_the_last(db):
    slots = SharedSlots(db, "gw")
    await slots.beat()
    slots.start_waiting()
    slots.start_waiting()
    await _settled(slots)
    marked = await waiting_since(db, "gw")
    assert marked is not None
    slots.stop_waiting(has_slot=False)
    await _settled(slots)
    assert await waiting_since(db, "gw") == marked  # one still waits: same place in line
    slots.stop_waiting(has_slot=False)
    await _settled(slots)
    assert await waiting_since(db, "gw") is None
    await slots.stop()
    assert await db.fetchval("SELECT count(*) FROM llama_gateways") == 0


async def _settled(slots: SharedSlots) -> None:
    for task in list(slots._tasks):
        await task


class GatedPool:
    """Answers the take only when told, and records the statements (logic only)."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.executed: list[tuple] = []

    async def fetchrow(self, query, *args):
        await self.answer.wait()
        return {"taken_backend": 7, "taken_slot": 0}

    async def execute(self, query, *args):
        self.executed.append(args)


async def test_a_slot_taken_for_a_request_that_has_gone_is_given_back():
    pool = GatedPool()
    slots = SharedSlots(pool, "gw")
    slots._last_beat = slots.clock()  # heartbeaten just now
    taking = asyncio.ensure_future(slots.take([7], is_waiter=False))
    await asyncio.sleep(0)  # the take is under way
    taking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await taking
    pool.answer.set()  # the database took the slot all the same
    await wait_until(lambda: pool.executed, "the slot given back")
    assert pool.executed[0][:5] == ("gw", 7, 0, 0, 0)


class SlowMark:
    """The real pool, whose waiting marks (execute) wait for `go` once `is_holding`."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.is_holding = False
        self.held = asyncio.Event()
        self.go = asyncio.Event()

    async def execute(self, *args):
        if self.is_holding:
            self.held.set()
            await self.go.wait()
        return await self.pool.execute(*args)

    def __getattr__(self, name):
        return getattr(self.pool, name)


async def test_a_waiting_mark_that_lands_after_the_take_that_cleared_it_is_cleared_again(db):
    # The first waiter's mark and its take run on two connections; a mark that commits
    # after the take left this gateway "waiting" with no waiter, and every other gateway
    # behind it until the next heartbeat.
    member = await add_member(db, "http://m:1", "m")
    slow = SlowMark(db)
    slots = SharedSlots(slow, "gw")
    await slots.beat()
    slow.is_holding = True
    slots.start_waiting()
    await slow.held.wait()  # the mark is on its way
    assert await slots.take([member], is_waiter=True) == (member, 0)
    slots.stop_waiting(has_slot=True)
    slow.go.set()
    await _settled(slots)
    assert await waiting_since(db, "gw") is None


class HeldTake:
    """The real pool, whose take (fetchrow) is committed but answered only on `go`."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.committed = asyncio.Event()
        self.go = asyncio.Event()

    async def fetchrow(self, *args):
        row = await self.pool.fetchrow(*args)
        self.committed.set()
        await self.go.wait()
        return row

    def __getattr__(self, name):
        return getattr(self.pool, name)


async def test_a_reconcile_waits_for_a_take_in_flight_and_counts_its_slot_held(db):
    # No restart here: the heartbeat is told of an older start time (logic only).
    member = await add_member(db, "http://m:1", "m")
    held_take = HeldTake(db)
    gateway = SharedSlots(held_take, "gw")
    await gateway.beat()
    gateway._db_started -= datetime.timedelta(minutes=1)
    taking = asyncio.ensure_future(gateway.take([member], is_waiter=False))
    await held_take.committed.wait()  # in the database, not yet in gateway.held
    beating = asyncio.ensure_future(gateway.beat())
    await wait_until(lambda: gateway._is_reconciling, "the reconcile under way")
    assert await gateway.take([member], is_waiter=False) is None  # none during it
    held_take.go.set()
    assert await taking == (member, 0)
    await beating
    assert not gateway._must_reconcile
    assert await holders(db, member) == ["gw"]


async def test_the_first_heartbeat_sees_no_restart_and_a_new_start_time_is_one(db):
    gateway = SharedSlots(db, "gw")
    await gateway.beat()
    await gateway.beat()
    assert gateway._db_started is not None and not gateway._must_reconcile
    gateway._db_started -= datetime.timedelta(seconds=1)
    await gateway.beat()
    assert gateway._db_started == await db.fetchval("SELECT pg_postmaster_start_time()")
    assert not gateway._must_reconcile  # reconciled in that beat


class RecordingConnection:
    def __init__(self, conn, statements: list[str]) -> None:
        self.conn = conn
        self.statements = statements

    async def execute(self, query, *args):
        self.statements.append(query)
        return await self.conn.execute(query, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


class RecordingPool:
    """The real pool; records the statements run on the connections it lends."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.statements: list[str] = []

    @contextlib.asynccontextmanager
    async def acquire(self):
        async with self.pool.acquire() as conn:
            yield RecordingConnection(conn, self.statements)

    def __getattr__(self, name):
        return getattr(self.pool, name)


async def test_only_the_first_heartbeat_waits_for_the_disk(db):
    # The grace after a restart (migration m012) needs the row of every gateway that may
    # hold a slot: its first heartbeat, before any take, must survive a crash.
    recording = RecordingPool(db)
    gateway = SharedSlots(recording, "gw")
    await gateway.beat()
    assert recording.statements == ["SET LOCAL synchronous_commit = on"]
    await gateway.beat()
    assert recording.statements == ["SET LOCAL synchronous_commit = on"]


class GiveBackFirst:
    """The real pool; the first connection the reconcile asks for is lent only after
    `gateway` has given back `slot` and its give-back has committed."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.gateway: SharedSlots | None = None
        self.slot: tuple[int, int] | None = None

    @contextlib.asynccontextmanager
    async def acquire(self):
        if self.gateway is not None and self.gateway._is_reconciling and self.slot:
            slot, self.slot = self.slot, None
            self.gateway.give_back(*slot, 1, 0)
            await _settled(self.gateway)
        async with self.pool.acquire() as conn:
            yield conn

    def __getattr__(self, name):
        return getattr(self.pool, name)


async def test_a_slot_given_back_while_the_reconcile_runs_is_not_left_held(db):
    # The reconcile saw the slot held, the give-back committed before it: it wrote the
    # slot back in the gateway's name, which no longer uses it.
    member = await add_member(db, "http://m:1", "m")
    racing = GiveBackFirst(db)
    gateway = racing.gateway = SharedSlots(racing, "gw")
    await gateway.beat()
    assert await gateway.take([member], is_waiter=False) == (member, 0)
    gateway._db_started -= datetime.timedelta(minutes=1)
    racing.slot = (member, 0)
    await gateway.beat()
    assert racing.slot is None  # the race took place
    await _settled(gateway)
    assert await holders(db, member) == [None]


async def _kept_after_one_request(db, slots: SharedSlots, member: int) -> None:
    await slots.beat()
    assert await slots.take([member], is_waiter=False) == (member, 0)
    slots.keep(member, 0, 1, 0)
    await _settled(slots)


async def test_a_kept_slot_is_used_with_no_round_trip_and_given_back_after_the_idle_time(db):
    member = await add_member(db, "http://m:1", "m")
    clock = Clock()
    slots = SharedSlots(db, "gw", clock=clock)
    await _kept_after_one_request(db, slots, member)
    assert await holders(db, member) == ["gw"]  # kept: still this gateway's lease
    assert await db.fetchval("SELECT requests FROM llama_backend_slots") == 1  # figures written
    assert slots.take_kept([member]) == (member, 0)
    slots.keep(member, 0, 1, 0)
    clock.now += slots.keep_idle_seconds / 2
    await slots.beat()
    assert await holders(db, member) == ["gw"]  # not idle long enough yet
    clock.now += slots.keep_idle_seconds / 2
    await slots.beat()
    await _settled(slots)
    assert await holders(db, member) == [None] and not slots.kept and not slots.held
    assert await db.fetchval("SELECT requests FROM llama_backend_slots") == 2


async def test_a_kept_slot_is_given_back_when_a_heartbeat_finds_another_gateway_waiting(db):
    member = await add_member(db, "http://m:1", "m")
    slots = SharedSlots(db, "gw")
    await _kept_after_one_request(db, slots, member)
    other = SharedSlots(db, "other")
    other.waiters = 1  # its heartbeat says it waits
    await other.beat()
    assert not slots.others_wait
    await slots.beat()
    await _settled(slots)
    assert slots.others_wait and not slots.may_keep
    assert await holders(db, member) == [None]
    other.waiters = 0
    await other.beat()
    await slots.beat()
    assert not slots.others_wait and slots.may_keep


async def test_a_kept_slot_is_given_back_once_heartbeats_fail_and_not_used_meanwhile(db):
    member = await add_member(db, "http://m:1", "m")
    switch, clock = Switch(db), Clock()
    slots = SharedSlots(switch, "gw", clock=clock)
    await _kept_after_one_request(db, slots, member)
    switch.is_down = True
    clock.now += slots.usable_for
    await slots.beat()
    await _settled(slots)
    assert slots.take_kept([member]) is None and not slots.kept
    switch.is_down = False
    assert await holders(db, member) == ["gw"]  # could not be given back while down
    await slots.beat()
    assert await holders(db, member) == [None]
