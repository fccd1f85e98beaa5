"""The database stopped under load, on a gateway with a local replica and a shared member:
the local replica keeps serving, the shared member gets nothing while no heartbeat goes
through, rows are spooled and land once the database is back, and the member is used
again. A PostgreSQL cluster of this module's own (outagefixture.py), fake upstreams."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import pytest_asyncio
from gatewayhelpers import add_user, bearer, chat, gateway_config, wait_until
from sharedmembers import BACKEND_SECRET, CountingUpstream, add_member, url_of

from proxy import appkeys
from proxy.app import make_app

pytest_plugins = ["gatewayfixture", "outagefixture"]
pytestmark = pytest.mark.asyncio

DEADLINE = 20.0  # generous: 2 shared cores; only there to turn a hang into a failure


@pytest_asyncio.fixture
async def own_db(own_dsn):
    pool = await asyncpg.create_pool(own_dsn, min_size=1, max_size=2)
    yield pool
    await pool.close()


class Traffic:
    """Users sending requests one after another; every status and request id."""

    def __init__(self, gateway, keys) -> None:
        self.gateway, self.keys = gateway, keys
        self.sent: dict[str, int] = {}
        self.is_done = False

    async def user(self, key: str) -> None:
        while not self.is_done:
            response = await self.gateway.post(
                "/v1/chat/completions", json=chat(), headers=bearer(key)
            )
            await response.read()
            self.sent[response.headers["X-Request-Id"]] = response.status

    def start(self) -> list[asyncio.Task]:
        return [asyncio.ensure_future(self.user(key)) for key in self.keys]


async def test_database_stopped_under_load_local_replica_serves_and_shared_one_waits(
    own_dsn,
    own_db,
    own_cluster,
    aiohttp_client,
    aiohttp_server,
    upstream,
    upstream_server,
    tmp_path,
):
    member = CountingUpstream(0.02)
    await add_member(own_db, url_of(await aiohttp_server(member.make_app())), "gpu")
    config = gateway_config(
        own_dsn,
        url_of(upstream_server),
        tmp_path,
        backend_secret=BACKEND_SECRET,
        auth_outage_grace_seconds=120.0,
        rate_limit=100_000,
    )
    gateway = await aiohttp_client(make_app(config))
    slots, backends = gateway.app[appkeys.SHARED_SLOTS], gateway.app[appkeys.BACKENDS]
    await wait_until(lambda: backends.members, "the member")
    traffic = Traffic(gateway, [await add_user(own_db, f"user{n}") for n in range(3)])
    tasks = traffic.start()
    await wait_until(lambda: member.chats >= 3, "the shared member to serve too", DEADLINE)
    await asyncio.to_thread(own_cluster.stop)
    await wait_until(lambda: not slots.is_usable, "the heartbeat to fail", DEADLINE)
    shared = next(iter(backends.members.values()))
    await wait_until(lambda: not shared.busy, "the member's requests to finish", DEADLINE)
    during = set(traffic.sent)
    served_by_member = member.chats
    local_before = len(upstream.seen)
    await wait_until(lambda: len(upstream.seen) >= local_before + 10, "local serving", DEADLINE)
    assert member.chats == served_by_member  # no shared slot without the database
    await asyncio.to_thread(own_cluster.start)
    await wait_until(lambda: slots.is_usable, "the heartbeat back", DEADLINE)
    await wait_until(lambda: member.chats > served_by_member, "the member used again", DEADLINE)
    traffic.is_done = True
    await asyncio.gather(*tasks)
    assert set(traffic.sent.values()) == {200}, traffic.sent
    assert len(set(traffic.sent) - during) >= 10
    # Every request, those of the outage included, reaches llama_requests (via the spool).
    wanted = set(traffic.sent)
    await wait_until(lambda: _logged(own_dsn, wanted), "every row in llama_requests", DEADLINE)


async def _logged(dsn: str, wanted: set[str]) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT request_id FROM llama_requests")
    finally:
        await conn.close()
    return wanted <= {row[0] for row in rows}
