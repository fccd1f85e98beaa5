"""Hears other gateways' token charges (LISTEN on TOKEN_CHANNEL) for the token limiter.

While this listener is not connected, the limiter treats every user as shared and asks
the database before admitting them, so a lost connection costs round trips, never
exactness. The connection itself is proxy/listener.py's, as auth's is.
"""

from __future__ import annotations

from proxy.listener import Subscription, listen_forever
from proxy.migrations import TOKEN_CHANNEL
from proxy.tokenlimit import TokenLimiter


async def listen_for_charges(dsn: str, limiter: TokenLimiter) -> None:
    """Forever: pass other gateways' charges to the limiter; reconnect when cut off."""

    def stop_listening() -> None:
        limiter.is_listening = False

    subscription = Subscription(
        label="token listener",
        channel=TOKEN_CHANNEL,
        on_notify=limiter.note_foreign_charge,
        on_listening=limiter.start_listening,
        on_lost=stop_listening,
    )
    await listen_forever(dsn, subscription)
