"""The shared slots across a restart of PostgreSQL, on a cluster of this module's own.

The leases commit without waiting for the disk, so a crash may lose the last ones: a take
(the slot shows free while its holder uses it) or a give-back (the slot stays in the name
of a gateway that no longer uses it). What the crash leaves is written by SQL after a real
restart; then the grace of migration m012 and the heartbeat's reconcile are under test.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from gatewayhelpers import wait_until
from sharedmembers import add_member, holders

from proxy import slotstore, store
from proxy.app import LEASE_SESSION_SETTINGS
from proxy.sharedslots import SharedSlots

pytest_plugins = ["outagefixture"]
pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def lease_pool(own_dsn):
    """A pool as the gateway's lease pool is (asynchronous commits)."""
    pool = await store.create_pool(own_dsn, server_settings=LEASE_SESSION_SETTINGS)
    yield pool
    await pool.close()


async def restart(cluster, pool) -> None:
    """Stop and start PostgreSQL; return once it answers the pool again."""
    await asyncio.to_thread(cluster.stop)
    await asyncio.to_thread(cluster.start)
    await pool.pool.expire_connections()  # the sessions the stop ended: new ones, on next use
    await wait_until(lambda: _answers(pool), "the database answering again")


async def beat(gateway: SharedSlots) -> None:
    """One heartbeat, which must go through."""
    before = gateway._last_beat
    await gateway.beat()
    assert gateway._last_beat > before, "the heartbeat did not go through"


async def _answers(pool) -> bool:
    try:
        return await pool.fetchval("SELECT true")
    except store.UNAVAILABLE_ERRORS:
        return False


async def test_after_a_restart_a_lost_take_is_not_taken_by_another_and_its_holder_keeps_it(
    own_cluster, lease_pool
):
    member = await add_member(lease_pool, "http://m:1", "m")
    holder, other = SharedSlots(lease_pool, "holder"), SharedSlots(lease_pool, "other")
    await beat(holder)
    await beat(other)
    assert await holder.take([member], is_waiter=False) == (member, 0)
    await restart(own_cluster, lease_pool)
    # What a crash may leave: the take's commit lost, the slot shows free.
    await lease_pool.execute("UPDATE llama_backend_slots SET gateway_id = NULL, leased_at = NULL")
    await beat(other)
    assert await other.take([member], is_waiter=False) is None  # the grace
    await beat(holder)  # sees the new start time: reconciles
    assert await holders(lease_pool, member) == ["holder"]
    assert not holder._must_reconcile
    await beat(other)
    assert await other.take([member], is_waiter=False) is None  # held, live
    # The grace lasts the lease: with one of 10 ms, long over, the slot given back is free.
    holder.give_back(member, 0, 1, 0)
    await wait_until(lambda: _is_free(lease_pool, member), "the slot given back")
    assert await slotstore.take_slot(lease_pool, "other", [member], False, 0.01) == (member, 0)


async def _is_free(pool, member: int) -> bool:
    return await holders(pool, member) == [None]


async def test_after_a_restart_a_slot_in_the_gateways_name_it_does_not_hold_is_freed(
    own_cluster, lease_pool
):
    member = await add_member(lease_pool, "http://m:1", "m", concurrency=2)
    gateway = SharedSlots(lease_pool, "gw")
    await beat(gateway)
    assert await gateway.take([member], is_waiter=False) == (member, 0)
    assert await gateway.take([member], is_waiter=False) == (member, 1)
    gateway.give_back(member, 1, 1, 0)
    await wait_until(lambda: _holds(lease_pool, member, ["gw", None]), "slot 1 given back")
    await restart(own_cluster, lease_pool)
    # What a crash may leave: the give-back's commit lost, slot 1 still in the gateway's name.
    await lease_pool.execute("UPDATE llama_backend_slots SET gateway_id = 'gw'")
    await beat(gateway)
    assert await holders(lease_pool, member) == ["gw", None]


async def _holds(pool, member: int, expected: list) -> bool:
    return await holders(pool, member) == expected
