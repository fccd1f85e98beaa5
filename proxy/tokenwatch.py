"""Hears other gateways' token charges (LISTEN on TOKEN_CHANNEL) for the token limiter.

While the gateway's LISTEN connection is down, the limiter treats every user as shared and
asks the database before admitting them, so a lost connection costs round trips, never
exactness. The connection itself is proxy/listener.py's, shared with auth's channel.
"""

from __future__ import annotations

from proxy.listener import Subscription
from proxy.migrations import TOKEN_CHANNEL
from proxy.tokenlimit import TokenLimiter


def charge_subscription(limiter: TokenLimiter) -> Subscription:
    """The token limiter's part of the gateway's LISTEN connection: other gateways' charges."""

    def stop_listening() -> None:
        limiter.is_listening = False

    return Subscription(
        channel=TOKEN_CHANNEL,
        on_notify=limiter.note_foreign_charge,
        on_listening=limiter.start_listening,
        on_lost=stop_listening,
    )
