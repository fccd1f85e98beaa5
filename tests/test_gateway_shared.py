"""Shared members of the pool (llama_backends) behind two gateways on one database: a new
member reaches every gateway within a second, a slot is never used by two gateways at
once, drained members take nothing new. Fake upstreams, the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port
from fakeupstream import FakeUpstream
from gatewayhelpers import add_user, bearer, chat, wait_until
from gatewayprocess import start_gateway_process
from sharedmembers import (
    BACKEND_SECRET,
    MEMBER_KEY,
    CountingUpstream,
    add_member,
    holders,
    url_of,
)

from proxy import appkeys, slotstore

pytest_plugins = ["gatewayfixture"]
pytestmark = pytest.mark.asyncio


async def shared_gateway(start_gateway, **overrides):
    """A gateway with no local replica, whose registry has loaded and listens."""
    gateway = await start_gateway(backend_urls=(), backend_secret=BACKEND_SECRET, **overrides)
    # Loaded once at start, once more when its LISTEN is in place: from then on it hears.
    await wait_until(lambda: gateway.app[appkeys.REGISTRY].loaded >= 2, "the registry listening")
    return gateway


async def post_chat(gateway, key: str, **extra):
    return await gateway.post("/v1/chat/completions", json=chat(**extra), headers=bearer(key))


async def test_a_gateway_with_no_backend_at_all_answers_no_backend(start_gateway, db):
    gateway = await shared_gateway(start_gateway)
    key = await add_user(db, "alice")
    response = await post_chat(gateway, key)
    assert response.status == 503
    error = (await response.json())["error"]
    assert error["code"] == "no_backend"
    assert "LLAMA_SERVER_REPLICAS" in error["message"] and "add-backend" in error["message"]
    ready = await gateway.get("/readyz")
    assert ready.status == 503
    assert "no backend in the pool" in (await ready.json())["backend"]


async def test_a_member_added_while_two_gateways_run_is_used_by_b_within_one_second(
    start_gateway, db, aiohttp_server
):
    member = FakeUpstream()
    server = await aiohttp_server(member.make_app())
    first = await shared_gateway(start_gateway)
    second = await shared_gateway(start_gateway)
    key = await add_user(db, "alice")
    added = time.monotonic()
    await add_member(db, url_of(server), "gpu1")
    await wait_until(
        lambda: second.app[appkeys.BACKENDS].members, "gateway B to see the member", timeout=1.0
    )
    response = await post_chat(second, key)
    assert response.status == 200, await response.text()
    assert time.monotonic() - added < 1.0
    assert first.app[appkeys.BACKENDS].members  # A too
    # The member's own key went upstream, never the gateway's local one.
    assert member.seen[-1].headers["Authorization"] == f"Bearer {MEMBER_KEY}"
    assert second.app[appkeys.QUEUE]._concurrency == 1
    # The slot was given back (the NOTIFY wakes other gateways' waiters).
    member_id = next(iter(second.app[appkeys.BACKENDS].members))
    await wait_until(_all_free(db, member_id), "the slot given back")


def _all_free(db, member_id):
    async def check():
        return all(holder is None for holder in await holders(db, member_id))

    return check


async def test_two_gateways_never_send_two_requests_at_once_to_a_slot(
    start_gateway, db, aiohttp_server
):
    members = [CountingUpstream(), CountingUpstream()]
    servers = [await aiohttp_server(member.make_app()) for member in members]
    gateways = [await shared_gateway(start_gateway) for _ in range(2)]
    for number, server in enumerate(servers):
        await add_member(db, url_of(server), f"gpu{number}")
    for gateway in gateways:
        await wait_until(lambda g=gateway: len(g.app[appkeys.BACKENDS].members) == 2, "members")
    keys = [await add_user(db, f"user{n}") for n in range(4)]
    responses = await asyncio.gather(*(post_chat(gateways[n % 2], keys[n % 4]) for n in range(24)))
    assert [response.status for response in responses] == [200] * 24
    assert [member.peak for member in members] == [1, 1]
    assert sum(member.chats for member in members) == 24
    assert all(member.chats for member in members)  # both members served


class Load:
    """Users sending requests one after another through gateways until stopped."""

    def __init__(self, gateways, keys) -> None:
        self.gateways, self.keys = gateways, keys
        self.statuses: list[int] = []
        self.is_done = False

    async def user(self, gateway, key: str) -> None:
        while not self.is_done:
            response = await post_chat(gateway, key)
            await response.read()
            self.statuses.append(response.status)

    def start(self) -> list[asyncio.Task]:
        return [
            asyncio.ensure_future(self.user(gateway, key))
            for gateway in self.gateways
            for key in self.keys
        ]

    async def stop(self, tasks) -> None:
        self.is_done = True
        await asyncio.gather(*tasks)


async def test_a_member_drained_under_load_finishes_its_requests_and_takes_nothing_new(
    start_gateway, db, aiohttp_server
):
    draining, staying = CountingUpstream(0.05), CountingUpstream(0.05)
    for name, member in (("draining", draining), ("staying", staying)):
        await add_member(db, url_of(await aiohttp_server(member.make_app())), name)
    gateways = [await shared_gateway(start_gateway) for _ in range(2)]
    for gateway in gateways:
        await wait_until(lambda g=gateway: len(g.app[appkeys.BACKENDS].members) == 2, "members")
    load = Load(gateways, [await add_user(db, f"user{n}") for n in range(3)])
    tasks = load.start()
    await wait_until(lambda: draining.chats >= 3 and draining.running, "load on the member")
    await db.execute("UPDATE llama_backends SET state = 'draining' WHERE name = 'draining'")
    drained = [
        next(b for b in g.app[appkeys.BACKENDS].backends if b.name == "draining") for g in gateways
    ]
    await wait_until(lambda: all(b.is_draining for b in drained), "both gateways to see it")
    await wait_until(lambda: not any(b.busy for b in drained), "its requests to finish")
    served_before = draining.chats
    await wait_until(lambda: staying.chats >= served_before + 10, "more load on the other")
    await load.stop(tasks)
    assert draining.chats == served_before  # nothing new went to it
    assert set(load.statuses) == {200}  # its in-flight requests finished, none failed
    assert gateways[0].app[appkeys.QUEUE]._concurrency == 1


async def test_a_user_flooding_gateway_a_does_not_starve_a_user_on_gateway_b(
    start_gateway, db, aiohttp_server
):
    member = FakeUpstream()
    member.gate = asyncio.Semaphore(0)  # each answer leaves only when the test allows it
    await add_member(db, url_of(await aiohttp_server(member.make_app())), "gpu")
    first, second = [await shared_gateway(start_gateway) for _ in range(2)]
    for gateway in (first, second):
        await wait_until(lambda g=gateway: g.app[appkeys.BACKENDS].members, "the member")
    flooder, single = await add_user(db, "flooder"), await add_user(db, "single")
    finished: list[str] = []

    async def ask(gateway, key, name):
        response = await post_chat(gateway, key, user=name)
        assert response.status == 200, await response.text()
        finished.append(name)

    floods = [asyncio.ensure_future(ask(first, flooder, "flooder")) for _ in range(6)]
    await wait_until(lambda: member.answering["flooder"] == 1, "the flood to hold the slot")
    await wait_until(lambda: first.app[appkeys.QUEUE].stats().waiting == 5, "the flood queued")
    lone = asyncio.ensure_future(ask(second, single, "single"))
    await wait_until(lambda: second.app[appkeys.SHARED_SLOTS].waiters == 1, "B to wait")
    for count in range(1, 8):
        member.allow()
        await wait_until(lambda c=count: len(finished) >= c, f"answer {count}")
    await asyncio.gather(lone, *floods)
    # B's user waited for the one flood request that held the slot, no more.
    assert finished.index("single") == 1, finished


async def test_slots_of_a_gateway_killed_with_sigkill_are_used_by_the_other_within_seconds(
    start_gateway, db, pg_dsn, aiohttp_server, tmp_path
):
    member = FakeUpstream()
    member.gate = asyncio.Semaphore(0)  # the killed gateway's request never gets its answer
    await add_member(db, url_of(await aiohttp_server(member.make_app())), "gpu")
    settings = {
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(free_port()),
        "LLAMA_PROXY_BACKEND_URL": "",
        "LLAMA_PROXY_BACKEND_SECRET": BACKEND_SECRET,
        "POSTGRES_AUTH_DSN": pg_dsn,
        "LLAMA_PROXY_SPOOL_PATH": str(tmp_path / "killed.spool"),
    }
    killed = await start_gateway_process(settings, tmp_path / "killed.log")
    survivor = await shared_gateway(start_gateway)
    await wait_until(lambda: survivor.app[appkeys.BACKENDS].members, "the member")
    key = await add_user(db, "alice")
    try:
        async with aiohttp.ClientSession() as session:
            held = asyncio.ensure_future(
                session.post(f"{killed.url}/v1/chat/completions", json=chat(), headers=bearer(key))
            )
            await wait_until(lambda: member.answering, "the killed gateway to hold the slot")
            member_id = next(iter(survivor.app[appkeys.BACKENDS].members))
            holder = (await holders(db, member_id))[0]
            assert holder is not None and holder != survivor.app[appkeys.SHARED_SLOTS].gateway_id
            killed.process.kill()
            killed.process.wait()
            killed_at = time.monotonic()
            member.gate = None  # answers go out at once from now on
            response = await post_chat(survivor, key)
            assert response.status == 200, await response.text()
            # The lease runs out LEASE_SECONDS after the last heartbeat; then it is free.
            assert time.monotonic() - killed_at < slotstore.LEASE_SECONDS + 3
            with contextlib.suppress(aiohttp.ClientError):
                await held
    finally:
        killed.stop()


async def test_a_turn_waits_for_a_held_slot_no_longer_than_the_queue_timeout(
    start_gateway, db, aiohttp_server
):
    member = FakeUpstream()
    member_id = await add_member(db, url_of(await aiohttp_server(member.make_app())), "gpu")
    gateway = await shared_gateway(start_gateway, queue_timeout_seconds=0.5)
    await wait_until(lambda: gateway.app[appkeys.BACKENDS].members, "the member")
    # Another gateway, alive, holds the one slot.
    await slotstore.heartbeat(db, "other", "host", False)
    assert await slotstore.take_slot(db, "other", [member_id], False) == (member_id, 0)
    response = await post_chat(gateway, await add_user(db, "alice"))
    assert response.status == 503
    assert response.headers["Retry-After"]
    error = (await response.json())["error"]
    assert error["code"] == "backend_busy" and "other gateways" in error["message"]
    assert not member.seen


async def test_metrics_and_readyz_name_shared_members(start_gateway, db, aiohttp_server):
    member = FakeUpstream()
    await add_member(db, url_of(await aiohttp_server(member.make_app())), "gpu-a")
    gateway = await shared_gateway(start_gateway)
    await wait_until(lambda: gateway.app[appkeys.BACKENDS].members, "the member")
    assert (await post_chat(gateway, await add_user(db, "alice"))).status == 200
    metrics = await (await gateway.get("/metrics")).text()
    assert 'llamagate_backend_requests_total{address="127.0.0.1:' in metrics
    assert 'backend="gpu-a"' in metrics
    ready = await gateway.get("/readyz")
    body = await ready.json()
    assert ready.status == 200, body
    assert body["backends"] == {"up": 1, "total": 1}
    assert body["shared"] == {"members": 1, "usable": True}


class OtherModelUpstream(FakeUpstream):
    """A member whose /v1/models now lists another model."""

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.middlewares.append(self.other_model)
        return app

    @web.middleware
    async def other_model(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path == "/v1/models":
            self._note(request, None)
            return web.json_response({"object": "list", "data": [{"id": "other"}]})
        return await handler(request)


async def test_a_member_that_now_serves_another_model_is_refused_and_takes_nothing(
    start_gateway, db, aiohttp_server
):
    changed, right = OtherModelUpstream(), FakeUpstream()
    await add_member(db, url_of(await aiohttp_server(changed.make_app())), "changed")
    await add_member(db, url_of(await aiohttp_server(right.make_app())), "right")
    first = await shared_gateway(start_gateway, model_name="m")
    second = await shared_gateway(start_gateway, model_name="m")
    for gateway in (first, second):
        await wait_until(lambda g=gateway: len(g.app[appkeys.BACKENDS].members) == 2, "members")
    key = await add_user(db, "alice")
    statuses = [(await post_chat(first, key)).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert [seen.path for seen in changed.seen] == ["/v1/models"]  # asked, never sent a chat
    row = await db.fetchrow("SELECT state, problem FROM llama_backends WHERE name = 'changed'")
    assert row["state"] == "refused"
    assert "serves other, not the pool's model 'm'" in row["problem"]
    assert "enable-backend changed" in row["problem"]
    # The trigger takes it out of the other gateway's pool too.
    await wait_until(
        lambda: (
            [b.name for b in second.app[appkeys.BACKENDS].backends if b.is_draining] == ["changed"]
        ),
        "gateway B to drop it",
    )
    assert second.app[appkeys.QUEUE]._concurrency == 1


async def test_only_the_leases_commit_without_waiting_for_the_disk(start_gateway):
    gateway = await shared_gateway(start_gateway)
    lease_pool = gateway.app[appkeys.SHARED_SLOTS].pool
    assert await lease_pool.fetchval("SHOW synchronous_commit") == "off"
    # The request log, token charges, users and the registry: synchronous, lose nothing.
    assert await gateway.app[appkeys.POOL].fetchval("SHOW synchronous_commit") == "on"


async def _one_gateway_with_a_member(start_gateway, db, aiohttp_server):
    member = CountingUpstream(0.0)
    member_id = await add_member(db, url_of(await aiohttp_server(member.make_app())), "gpu")
    gateway = await shared_gateway(start_gateway)
    await wait_until(lambda: gateway.app[appkeys.BACKENDS].members, "the member")
    return gateway, member_id


async def test_back_to_back_requests_on_one_gateway_take_the_shared_slot_once(
    start_gateway, db, aiohttp_server, monkeypatch
):
    takes = []

    async def counted_take(*args, **kwargs):
        takes.append(args[2])
        return await take_slot(*args, **kwargs)

    take_slot = slotstore.take_slot
    monkeypatch.setattr(slotstore, "take_slot", counted_take)
    gateway, member_id = await _one_gateway_with_a_member(start_gateway, db, aiohttp_server)
    gateway.app[appkeys.SHARED_SLOTS].keep_idle_seconds = 60.0  # no heartbeat gives it back
    key = await add_user(db, "alice")
    for _ in range(5):
        assert (await post_chat(gateway, key)).status == 200
    assert takes == [[member_id]]  # then kept: no round trip for the next four
    gateway_id = gateway.app[appkeys.SHARED_SLOTS].gateway_id
    assert await holders(db, member_id) == [gateway_id]

    async def figures_written():
        return await db.fetchval("SELECT requests FROM llama_backend_slots") == 5

    await wait_until(figures_written, "the figures of the five requests")


async def test_a_gateway_that_starts_waiting_gets_a_slot_kept_by_another_at_once(
    start_gateway, db, aiohttp_server
):
    keeper, member_id = await _one_gateway_with_a_member(start_gateway, db, aiohttp_server)
    kept = keeper.app[appkeys.SHARED_SLOTS]
    kept.keep_idle_seconds = 60.0
    # No heartbeat of the keeper's may free it meanwhile: the one under way is its last
    # for a minute (its lease then runs out after 5 s, long after this test's bound).
    kept.heartbeat_seconds, last_beat = 60.0, kept._last_beat
    await wait_until(lambda: kept._last_beat > last_beat, "the keeper's last heartbeat")
    other = await shared_gateway(start_gateway)
    await wait_until(lambda: other.app[appkeys.BACKENDS].members, "the member")
    key = await add_user(db, "alice")
    assert (await post_chat(keeper, key)).status == 200
    assert await holders(db, member_id) == [kept.gateway_id]
    started = time.monotonic()
    assert (await post_chat(other, key)).status == 200
    # Its 'wait' notification frees it, not a heartbeat nor the lease running out.
    assert time.monotonic() - started < 1.0


async def test_a_drained_member_gets_its_kept_slot_back_at_once(start_gateway, db, aiohttp_server):
    gateway, member_id = await _one_gateway_with_a_member(start_gateway, db, aiohttp_server)
    gateway.app[appkeys.SHARED_SLOTS].keep_idle_seconds = 60.0
    assert (await post_chat(gateway, await add_user(db, "alice"))).status == 200
    assert await holders(db, member_id) == [gateway.app[appkeys.SHARED_SLOTS].gateway_id]
    await db.execute("UPDATE llama_backends SET state = 'draining' WHERE id = $1", member_id)
    await wait_until(_all_free(db, member_id), "the kept slot given back", timeout=5)
    assert not gateway.app[appkeys.SHARED_SLOTS].kept
