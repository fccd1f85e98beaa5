"""Hears other gateways' token charges (LISTEN on TOKEN_CHANNEL) for the token limiter.

While this listener is not connected, the limiter treats every user as shared and asks
the database before admitting them, so a lost connection costs round trips, never
exactness. Shaped as auth's listener (proxy/auth.py), on a connection of its own.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from proxy import store
from proxy.migrations import TOKEN_CHANNEL
from proxy.tokenlimit import TokenLimiter

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
PROBE_SECONDS = 2.0  # a connection lost without a word is noticed within twice this


async def listen_for_charges(dsn: str, limiter: TokenLimiter) -> None:
    """Forever: pass other gateways' charges to the limiter; reconnect when cut off."""
    has_warned = False
    while True:
        try:
            conn = await store.connect(dsn)
        except store.StoreError as error:
            if not has_warned:  # once per outage, not once a second
                log.warning("token listener: %s; retrying every %ss", error, RETRY_SECONDS)
                has_warned = True
        else:
            has_warned = False
            try:
                await _listen_until_lost(conn, limiter)
            except store.UNAVAILABLE_ERRORS as error:
                log.warning("token listener lost its connection (%s)", type(error).__name__)
            except Exception:  # noqa: BLE001 - without it, sharing would go unnoticed
                log.exception("token listener: unexpected error; reconnecting")
            finally:
                limiter.is_listening = False
                conn.terminate()
        await asyncio.sleep(RETRY_SECONDS)


async def _listen_until_lost(conn: asyncpg.Connection, limiter: TokenLimiter) -> None:
    lost = asyncio.get_running_loop().create_future()
    conn.add_termination_listener(lambda _conn: lost.done() or lost.set_result(None))
    await conn.add_listener(TOKEN_CHANNEL, lambda *args: limiter.note_foreign_charge(args[-1]))
    limiter.start_listening()
    while not lost.done():
        try:
            await asyncio.wait_for(asyncio.shield(lost), timeout=PROBE_SECONDS)
        except TimeoutError:
            await conn.fetchval("SELECT 1", timeout=PROBE_SECONDS)
