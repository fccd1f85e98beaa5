"""proxy/pool.py: which backend a granted turn goes to (pure logic, an injected clock)."""

from __future__ import annotations

import asyncio

import pytest

import proxy.pool
from proxy.configparse import parse_backend_urls
from proxy.pool import WAIT, BackendPool
from proxy.registry import Member

URLS = ("http://127.0.0.1:8000", "http://127.0.0.1:8001", "http://127.0.0.1:8002")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_turns_go_to_the_least_recently_used_backend_with_a_free_slot():
    pool = BackendPool(URLS, slots=1)
    first, second = pool.backends[0], pool.backends[1]
    assert pool.pick(()) is first  # never used: by their order
    first.last_used, second.last_used = 5, 3
    pool.backends[2].busy = 1  # the least recently used of all, but full
    pool.backends[2].last_used = 1
    assert pool.pick(()) is second


@pytest.mark.asyncio
async def test_acquire_rotates_over_the_backends_and_release_keeps_the_figures():
    clock = Clock()
    pool = BackendPool(URLS[:2], slots=2, clock=clock)
    leases = [await pool.acquire() for _ in range(3)]
    assert [lease.backend.index for lease in leases] == [0, 1, 0]
    assert [backend.busy for backend in pool.backends] == [2, 1]
    clock.now += 2.5
    pool.release(leases[0], is_failed=False)
    pool.release(leases[1], is_failed=True)
    first, second = pool.backends
    assert (first.busy, first.requests, first.errors, first.seconds_busy) == (1, 2, 0, 2.5)
    assert (second.busy, second.requests, second.errors, second.seconds_busy) == (0, 1, 1, 2.5)
    assert pool.capacity == 4


def test_a_down_backend_gets_no_turn_while_another_is_up_and_rejoins_when_marked_up():
    pool = BackendPool(URLS[:2], slots=1)
    first, second = pool.backends
    pool.mark_down(first, "ClientConnectorError")
    assert (first.is_up, first.problem, pool.serving()) == (False, "ClientConnectorError", 1)
    assert pool.pick(()) is second
    second.busy = 1
    assert pool.pick(()) == WAIT  # wait for the busy one that is up, not the down one
    pool.mark_up(first)
    assert (first.is_up, first.problem, pool.serving()) == (True, "", 2)
    assert pool.pick(()) is first


def test_each_backend_is_tried_once_the_down_ones_last():
    pool = BackendPool(URLS, slots=1)
    pool.mark_down(pool.backends[0], "refused")
    assert pool.pick(()) is pool.backends[1]
    assert pool.pick({1}) is pool.backends[2]
    assert pool.pick({1, 2}) is pool.backends[0]  # a last resort: it may just be back
    assert pool.pick({0, 1, 2}) is None


@pytest.mark.asyncio
async def test_a_turn_waits_for_a_slot_on_an_up_backend_and_takes_the_one_freed():
    pool = BackendPool(URLS[:2], slots=1)
    pool.mark_down(pool.backends[0], "refused")
    held = await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    assert not waiting.done()
    pool.release(held, is_failed=False)
    lease = await asyncio.wait_for(waiting, 5)
    assert lease is not None and lease.backend is pool.backends[1]


@pytest.mark.asyncio
async def test_a_turn_waiting_for_a_slot_takes_a_backend_that_rejoins():
    pool = BackendPool(URLS[:2], slots=1)
    pool.mark_down(pool.backends[0], "refused")
    await pool.acquire()
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    pool.mark_up(pool.backends[0])
    lease = await asyncio.wait_for(waiting, 5)
    assert lease is not None and lease.backend is pool.backends[0]


@pytest.mark.asyncio
async def test_a_turn_whose_last_untried_backend_is_down_but_busy_waits_for_its_slot():
    # A rolling restart: backend 1 has just stopped (it refused this turn), backend 0 has
    # just come back before its probe saw it, and serves another turn's last resort.
    pool = BackendPool(URLS[:2], slots=1)
    first = pool.backends[0]
    pool.mark_down(first, "refused")
    pool.mark_down(pool.backends[1], "refused")
    held = await pool.acquire({1})
    assert held is not None and held.backend is first
    assert pool.pick({1}) == WAIT  # not None: that would be a 502 with a backend serving
    waiting = asyncio.create_task(pool.acquire({1}))
    await asyncio.sleep(0)
    assert not waiting.done()
    pool.release(held, is_failed=False)
    lease = await asyncio.wait_for(waiting, 5)
    assert lease is not None and lease.backend is first
    assert pool.pick({0, 1}) is None  # every backend tried: nothing left to wait for


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:8000", ("http://127.0.0.1:8000",)),
        (" http://a:1/ , http://b:2", ("http://a:1", "http://b:2")),
        ("", ()),  # no local replica: every backend is a shared member
    ],
)
def test_backend_urls_are_a_comma_separated_list(text, expected):
    assert parse_backend_urls(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://a:1,http://a:1/", "lists http://a:1 twice"),
        ("http://a:1,,http://b:2", "has an empty entry"),
        ("127.0.0.1:8000", "is not an http:// URL"),
        ("ftp://a:1", "is not an http:// URL"),
        ("http://a:port", "is not a URL"),
        ("http://a:1?x=1", "has a query"),
    ],
)
def test_bad_backend_urls_are_refused_naming_the_problem(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_backend_urls(text)


class FakeSharedSlots:
    """Stands in for proxy/sharedslots.py: slots per member id, free or held (pure logic)."""

    def __init__(self, free: dict[int, list[int]]) -> None:
        self.free = free
        self.takes: list[list[int]] = []
        self.given_back: list[tuple[int, int, int, int]] = []
        self.waiters = 0
        self.on_free = lambda: None
        self.may_keep = False  # keeping slots is proxy/sharedslots.py's, tested there

    def take_kept(self, backend_ids):
        return None

    def give_back_kept(self, backend_id=None, idle_for=0.0):
        pass

    async def take(self, backend_ids, is_waiter):
        self.takes.append(list(backend_ids))
        for member_id in backend_ids:
            if self.free.get(member_id):
                return member_id, self.free[member_id].pop(0)
        return None

    def give_back(self, member_id, slot, requests, errors):
        self.given_back.append((member_id, slot, requests, errors))
        self.free.setdefault(member_id, []).append(slot)
        self.on_free()

    def start_waiting(self):
        self.waiters += 1

    def stop_waiting(self, has_slot):
        self.waiters -= 1


def member(member_id: int, state: str = "active", concurrency: int = 1) -> Member:
    return Member(member_id, f"gpu{member_id}", f"http://10.0.0.{member_id}:8000", concurrency,
                  f"key{member_id}", state)  # fmt: skip


@pytest.mark.asyncio
async def test_a_turn_takes_a_local_slot_first_and_a_shared_one_only_when_none_is_free():
    pool = BackendPool(URLS[:1], slots=1, key="local")
    shared = FakeSharedSlots({7: [0]})
    pool.share_through(shared)
    capacities = []
    pool.on_capacity = capacities.append
    pool.update_members([member(7)])
    assert capacities == [2]
    local = await pool.acquire()
    assert local.backend.authorization == "Bearer local" and shared.takes == []
    remote = await pool.acquire()
    assert (remote.backend.name, remote.slot, remote.backend.authorization) == (
        "gpu7",
        0,
        "Bearer key7",
    )
    pool.release(remote, is_failed=True)
    assert shared.given_back == [(7, 0, 1, 1)]


@pytest.mark.asyncio
async def test_a_drained_member_takes_nothing_new_and_a_waiter_gets_the_next_free_slot():
    pool = BackendPool((), slots=1, wait_seconds=5)
    shared = FakeSharedSlots({1: [0], 2: []})
    pool.share_through(shared)
    pool.update_members([member(1), member(2)])
    held = await pool.acquire()
    assert held.backend.member_id == 1
    pool.update_members([member(1, "draining"), member(2)])
    assert pool.capacity == 1
    waiting = asyncio.ensure_future(pool.acquire())
    await asyncio.sleep(0)
    assert not waiting.done() and shared.takes[-1] == [2]  # not the drained one
    pool.release(held, is_failed=False)  # in flight on the drained member: it finishes
    shared.give_back(2, 0, 0, 0)  # another gateway gives back member 2's slot
    lease = await asyncio.wait_for(waiting, 5)
    assert lease.backend.member_id == 2 and shared.waiters == 0
    pool.update_members([member(2)])  # member 1 removed
    assert [backend.name for backend in pool.backends] == ["gpu2"]


class RacingSharedSlots(FakeSharedSlots):
    """The first take misses a slot that another request of this gateway gives back while
    the take runs: the wake-up comes before the turn waits."""

    async def take(self, backend_ids, is_waiter):
        if self.takes:
            return await super().take(backend_ids, is_waiter)
        self.takes.append(list(backend_ids))
        await asyncio.sleep(0)  # the take's round trip to PostgreSQL
        self.give_back(7, 0, 1, 0)
        return None


@pytest.mark.asyncio
async def test_a_slot_given_back_while_the_take_runs_is_taken_at_once_not_at_the_next_poll(
    monkeypatch,
):
    # One client sending requests back to back through a member of concurrency 1: each
    # take raced the previous request's give-back, and waited for the poll (0.25 s).
    monkeypatch.setattr(proxy.pool, "POLL_SECONDS", 60.0)
    pool = BackendPool((), slots=1, wait_seconds=120)
    shared = RacingSharedSlots({7: []})
    pool.share_through(shared)
    pool.update_members([member(7)])
    lease = await asyncio.wait_for(pool.acquire(), 10)
    assert (lease.backend.member_id, lease.slot) == (7, 0)
    assert len(shared.takes) == 2 and shared.waiters == 0


@pytest.mark.asyncio
async def test_kept_slots_of_a_member_go_back_when_it_is_refused_removed_or_down():
    pool = BackendPool((), slots=1)
    shared = FakeSharedSlots({})
    given_back_kept = []
    shared.give_back_kept = lambda backend_id=None, idle_for=0.0: given_back_kept.append(backend_id)
    pool.share_through(shared)
    pool.update_members([member(1), member(2), member(3)])
    assert given_back_kept == []
    pool.update_members([member(1, "refused"), member(3)])  # member 2 removed
    pool.mark_down(pool.members[3], "ClientConnectorError from its health probe")
    assert given_back_kept == [1, 2, 3]
