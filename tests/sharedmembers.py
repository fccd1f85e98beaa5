"""Shared backends registered straight through SQL (and proxy/sealing.py), as add-backend
would, so the gateway-side tests do not depend on the admin commands; and a fake member
that counts the requests it runs at once."""

from __future__ import annotations

import asyncio

import asyncpg
from fakeupstream import FakeUpstream

from proxy.sealing import seal

BACKEND_SECRET = "the-gateways-backend-secret"
MEMBER_KEY = "key-of-a-shared-member"


async def add_member(
    pool: asyncpg.Pool,
    url: str,
    name: str,
    concurrency: int = 1,
    key: str = MEMBER_KEY,
    secret: str = BACKEND_SECRET,
    state: str = "active",
) -> int:
    """Register a shared member with its slot rows; return its id."""
    async with pool.acquire() as conn, conn.transaction():
        member_id = await conn.fetchval(
            "INSERT INTO llama_backends (name, url, concurrency, sealed_key, state) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING id",
            name,
            url,
            concurrency,
            seal(secret, name, url, key),
            state,
        )
        await conn.execute(
            "INSERT INTO llama_backend_slots (backend_id, slot) "
            "SELECT $1, generate_series(0, $2 - 1)",
            member_id,
            concurrency,
        )
    return member_id


async def holders(pool: asyncpg.Pool, member_id: int) -> list[str | None]:
    """Who holds each slot of a member, by slot number."""
    rows = await pool.fetch(
        "SELECT gateway_id FROM llama_backend_slots WHERE backend_id = $1 ORDER BY slot",
        member_id,
    )
    return [row["gateway_id"] for row in rows]


class CountingUpstream(FakeUpstream):
    """A fake member that takes `seconds` per chat and counts the chats it runs at once."""

    def __init__(self, seconds: float = 0.02) -> None:
        super().__init__()
        self.seconds = seconds
        self.running = 0
        self.peak = 0
        self.chats = 0

    async def chat(self, request):
        self.running += 1
        self.chats += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.seconds)  # the work of generating, not synchronisation
            return await super().chat(request)
        finally:
            self.running -= 1


def url_of(server) -> str:
    return str(server.make_url("")).rstrip("/")
