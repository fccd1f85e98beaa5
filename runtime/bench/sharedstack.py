"""What scenario 9 needs around the private stack: shared members in its database,
gateways with no local replica, and the canned members' own overlap counts.

Members are registered with the admin's own SQL (proxy/backendstore.py: a llama_backends
row with its key sealed under the stack's LLAMA_PROXY_BACKEND_SECRET, one
llama_backend_slots row per slot), but not through add-backend's command, whose model
check would only ask the canned upstream a question it cannot fail. Every gateway on the
stack's database sees them within a notification, so the scenario removes them again
before any other scenario runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import asyncpg

from proxy import backendstore
from proxy.backendstore import NewBackend
from proxy.sealing import seal
from runtime.bench.errors import BenchError
from runtime.bench.sharedfigures import Overlaps
from runtime.bench.stack import Stack, free_port, start_side_gateway

# What the canned upstream lists in /v1/models (runtime/bench/upstream.py), so that a
# gateway that checks a member's model finds its own.
CANNED_MODEL = "canned"
MEMBERS_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True)
class SharedMember:
    name: str
    url: str
    concurrency: int = 1


def register_members(stack: Stack, members: list[SharedMember]) -> None:
    """Add the members and their slot rows with the admin's SQL (proxy/backendstore.py),
    their keys sealed as add-backend seals them."""
    secret = stack.env["LLAMA_PROXY_BACKEND_SECRET"]

    async def insert(conn: asyncpg.Connection) -> None:
        for member in members:
            sealed = seal(secret, member.name, member.url, secrets.token_urlsafe(32))
            new = NewBackend(member.name, member.url, member.concurrency, sealed, CANNED_MODEL)
            await backendstore.add_backend(conn, new)

    asyncio.run(_with_connection(stack, insert))


def remove_members(stack: Stack, names: list[str]) -> None:
    """Remove the members that exist (their slot rows go with them); a cleanup step, so it
    never raises over the error that may be unwinding."""

    async def delete(conn: asyncpg.Connection) -> None:
        for name in names:
            with contextlib.suppress(backendstore.UnknownBackend):
                await backendstore.remove_backend(conn, name)

    with contextlib.suppress(OSError, asyncpg.PostgresError):
        asyncio.run(_with_connection(stack, delete))


async def _with_connection(stack: Stack, work) -> None:
    conn = await asyncpg.connect(stack.dsn())
    try:
        await work(conn)
    finally:
        await conn.close()


def start_member_gateway(stack: Stack, name: str, exits: contextlib.ExitStack, members: int) -> str:
    """A gateway with no local replica on the stack's database; its URL, once its /readyz
    counts `members` shared members."""
    # A gateway-only host's settings: the console hands its gateway no replica URL.
    overrides = {**gateway_settings(), "LLAMA_SERVER_REPLICAS": "0"}
    url, _ = start_side_gateway(stack, name, free_port(), overrides, exits)
    wait_for_members(url, members)
    return url


def start_replica_gateway(
    stack: Stack, name: str, upstream_port: int, exits: contextlib.ExitStack
) -> str:
    """A gateway whose one local replica is the canned upstream on `upstream_port`, at
    concurrency 1 like a member. Its backend secret is its own, so no key of a shared
    member opens there: it leaves every member out and serves through its replica alone."""
    overrides = {
        **gateway_settings(),
        "LLAMA_PROXY_BACKEND_CONCURRENCY": "1",
        "LLAMA_PROXY_BACKEND_SECRET": secrets.token_urlsafe(32),
    }
    url, _ = start_side_gateway(stack, name, upstream_port, overrides, exits)
    return url


def gateway_settings() -> dict[str, str]:
    # The model name the canned upstream serves, so a member's model check passes; one
    # thread, so the settings check does not ask for more cores than the bench has.
    return {"LLAMA_MODEL_ALIAS": CANNED_MODEL, "LLAMA_N_THREADS": "1"}


def wait_for_members(gateway_url: str, count: int) -> None:
    """Wait until the gateway's /readyz counts `count` shared members; BenchError if not."""
    deadline = time.monotonic() + MEMBERS_TIMEOUT_SECONDS
    seen = None
    while time.monotonic() < deadline:
        seen = (read_json(gateway_url + "/readyz").get("shared") or {}).get("members")
        if seen == count:
            return
        time.sleep(0.05)
    raise BenchError(
        f"the gateway on {gateway_url} counted {seen} shared members, not {count}, within "
        f"{MEMBERS_TIMEOUT_SECONDS:.0f}s of their registration; see its log"
    )


def take_overlaps(ports: list[int]) -> list[Overlaps]:
    """Each canned member's figures since the last call (and a fresh count from now)."""
    return [
        Overlaps.from_json(read_json(f"http://127.0.0.1:{port}/bench/overlaps")) for port in ports
    ]


def read_json(url: str) -> dict:
    """GET url's JSON body, whatever the status (/readyz answers 503 with a body too)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return json.loads(error.read() or b"{}")
    except (OSError, ValueError) as error:
        raise BenchError(f"could not read {url}: {error}") from None
