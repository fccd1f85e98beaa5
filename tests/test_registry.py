"""The shared members as the gateway loads them (proxy/registry.py), against the real
PostgreSQL: keys unsealed, a key that will not open left out with one line naming the fix,
changes heard on BACKENDS_CHANNEL, and a reload on every reconnect of the listener."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from gatewayhelpers import wait_until
from sharedmembers import BACKEND_SECRET, MEMBER_KEY, add_member

from proxy.listener import APPLICATION_NAME, listen_forever
from proxy.registry import Registry, load_members

pytest_plugins = ["gatewayfixture"]
pytestmark = pytest.mark.asyncio


async def test_a_member_whose_key_will_not_open_is_left_out_with_one_line_naming_the_fix(
    db, caplog
):
    await add_member(db, "http://a:1", "good")
    await add_member(db, "http://b:1", "foreign", secret="another-secret")
    seen = []
    registry = Registry(db, BACKEND_SECRET, seen.append)
    with caplog.at_level(logging.ERROR, logger="proxy.registry"):
        assert await registry.reload()
        assert await registry.reload()
    assert [[member.name for member in members] for members in seen] == [["good"], ["good"]]
    assert seen[0][0].key == MEMBER_KEY and seen[0][0].state == "active"
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1, lines  # once, not on every reload
    assert "'foreign' left out" in lines[0] and "LLAMA_PROXY_BACKEND_SECRET" in lines[0]
    members, problems = await load_members(db, "")
    assert members == [] and len(problems) == 2 and "is empty" in problems[0]


async def test_changes_are_heard_and_a_reconnect_reloads_what_was_missed(db, pg_dsn):
    seen: list[list[str]] = []
    registry = Registry(db, BACKEND_SECRET, lambda members: seen.append([m.name for m in members]))
    listener = asyncio.ensure_future(listen_forever(pg_dsn, [registry.subscription()]))
    try:
        await wait_until(lambda: registry.loaded >= 1, "the load on listening")
        await add_member(db, "http://a:1", "first")
        await wait_until(lambda: seen and seen[-1] == ["first"], "the notification")
        # Cut the listener off, and change the table while nobody listens.
        await db.execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
            "WHERE application_name = $1",
            APPLICATION_NAME,
        )
        await db.execute("UPDATE llama_backends SET state = 'draining'")
        await add_member(db, "http://b:1", "second")
        await wait_until(
            lambda: seen[-1] == ["first", "second"], "the reload on reconnecting", timeout=10
        )
        members, _ = await load_members(db, BACKEND_SECRET)
        assert [member.state for member in members] == ["draining", "active"]
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await registry.close()
