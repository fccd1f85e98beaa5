"""proxy/pool.py: which backend a granted turn goes to (pure logic, an injected clock)."""

from __future__ import annotations

import asyncio

import pytest

from proxy.configparse import parse_backend_urls
from proxy.pool import WAIT, BackendPool

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
