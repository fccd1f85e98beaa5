"""The lease SQL of the shared slots (proxy/slotstore.py), against the real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from sharedmembers import add_member, holders

from proxy import slotstore

pytest_plugins = ["gatewayfixture"]
pytestmark = pytest.mark.asyncio


async def test_two_gateways_never_hold_one_slot(db):
    member = await add_member(db, "http://m:1", "m", concurrency=2)
    for gateway in ("a", "b", "c"):
        await slotstore.heartbeat(db, gateway, "host", False)
    # Six takes racing for two slots: exactly two win, by two distinct rows.
    taken = await asyncio.gather(
        *(slotstore.take_slot(db, g, [member], False) for g in ("a", "b", "c") * 2)
    )
    won = [slot for slot in taken if slot is not None]
    assert sorted(won) == [(member, 0), (member, 1)]
    assert None not in await holders(db, member)
    assert await slotstore.take_slot(db, "a", [member], False) is None


async def test_a_take_racing_an_uncommitted_one_does_not_get_its_slot(db):
    member = await add_member(db, "http://m:1", "m")
    await slotstore.heartbeat(db, "a", "host", False)
    await slotstore.heartbeat(db, "b", "host", False)
    async with db.acquire() as conn:
        async with conn.transaction():
            assert await slotstore.take_slot(conn, "a", [member], False) == (member, 0)
            # "b" reads the slot as free (a's take is not committed) while "a" holds its lock.
            racing = asyncio.ensure_future(slotstore.take_slot(db, "b", [member], False))
            await asyncio.wait({racing}, timeout=0.5)
        assert await asyncio.wait_for(racing, 5) is None
    assert await holders(db, member) == ["a"]


async def test_a_given_back_slot_is_free_again_and_counted(db):
    member = await add_member(db, "http://m:1", "m")
    await slotstore.heartbeat(db, "a", "host", False)
    await slotstore.heartbeat(db, "b", "host", False)
    assert await slotstore.take_slot(db, "a", [member], False) == (member, 0)
    # Only the holder gives a slot back.
    await slotstore.give_back(db, "b", member, 0, 1, 0)
    assert await holders(db, member) == ["a"]
    await slotstore.give_back(db, "a", member, 0, 1, 1)
    assert await holders(db, member) == [None]
    figures = await db.fetchrow("SELECT requests, errors, last_used FROM llama_backend_slots")
    assert (figures["requests"], figures["errors"]) == (1, 1) and figures["last_used"]
    assert await slotstore.take_slot(db, "b", [member], False) == (member, 0)


async def test_a_stale_holders_slot_is_free_after_the_lease(db):
    member = await add_member(db, "http://m:1", "m")
    await slotstore.heartbeat(db, "dead", "host", False)
    await slotstore.heartbeat(db, "live", "host", False)
    assert await slotstore.take_slot(db, "dead", [member], False, lease_seconds=0.3) is not None
    assert await slotstore.take_slot(db, "live", [member], False, lease_seconds=0.3) is None
    await asyncio.sleep(0.4)  # the lease itself is what is tested: "dead" stops heartbeating
    await slotstore.heartbeat(db, "live", "host", False)
    assert await slotstore.take_slot(db, "live", [member], False, lease_seconds=0.3) == (member, 0)
    assert await holders(db, member) == ["live"]


async def test_the_gateway_waiting_longest_goes_first(db):
    member = await add_member(db, "http://m:1", "m")
    await slotstore.heartbeat(db, "first", "host", True)
    await slotstore.heartbeat(db, "second", "host", True)
    await slotstore.heartbeat(db, "idle", "host", False)
    # Neither a later waiter nor a gateway not waiting may take it before "first".
    assert await slotstore.take_slot(db, "second", [member], False) is None
    assert await slotstore.take_slot(db, "idle", [member], False) is None
    assert await slotstore.take_slot(db, "first", [member], True) == (member, 0)
    await slotstore.give_back(db, "first", member, 0, 1, 0)
    # "first" still had waiters, so it went to the back of the line: "second" is next.
    assert await slotstore.take_slot(db, "first", [member], True) is None
    assert await slotstore.take_slot(db, "second", [member], False) == (member, 0)
    rows = await db.fetch("SELECT gateway_id, waiting_since FROM llama_gateways ORDER BY 1")
    waiting = {row["gateway_id"]: row["waiting_since"] for row in rows}
    assert waiting["second"] is None and waiting["first"] is not None


async def test_a_stale_waiter_holds_nobody_back(db):
    member = await add_member(db, "http://m:1", "m")
    await slotstore.heartbeat(db, "gone", "host", True)
    await slotstore.heartbeat(db, "here", "host", False)
    assert await slotstore.take_slot(db, "here", [member], False) is None
    await asyncio.sleep(0.4)
    await slotstore.heartbeat(db, "here", "host", False)
    assert await slotstore.take_slot(db, "here", [member], False, lease_seconds=0.3) is not None


async def test_shutdown_gives_back_every_slot_and_forgets_the_gateway(db):
    member = await add_member(db, "http://m:1", "m", concurrency=2)
    await slotstore.heartbeat(db, "a", "host", False)
    await slotstore.take_slot(db, "a", [member], False)
    await slotstore.take_slot(db, "a", [member], False)
    await slotstore.give_back_all(db, "a")
    assert await holders(db, member) == [None, None]
    assert await db.fetchval("SELECT count(*) FROM llama_gateways") == 0


async def test_rows_of_gateways_gone_long_ago_are_forgotten(db):
    await slotstore.heartbeat(db, "gone", "host", False)
    await slotstore.heartbeat(db, "here", "host", False)
    await db.execute(
        "UPDATE llama_gateways SET last_seen = now() - interval '2 hours' WHERE gateway_id = 'gone'"
    )
    await slotstore.forget_gone_gateways(db, 3600)
    assert await db.fetchval("SELECT array_agg(gateway_id) FROM llama_gateways") == ["here"]
