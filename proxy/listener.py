"""One LISTEN connection that outlives anything: it reconnects, and probes for a silent loss.

Auth (AUTH_CHANNEL: users or keys changed) and the token limiter (TOKEN_CHANNEL: another
gateway charged tokens) both hear the other gateways this way, each on a connection of
its own. While a listener is not connected its owner must not trust what it cached, so
the owner is told when listening starts and when it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from proxy import store

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
# How often a listener probes its connection; a silent loss is noticed within twice this.
PROBE_SECONDS = 2.0
# How its connection shows in pg_stat_activity, so an operator can tell it from the pool's.
APPLICATION_NAME = "llamagate listener"


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Subscription:
    """What one listener hears, and whom it tells."""

    label: str  # names the listener in log lines, such as "auth listener"
    channel: str
    on_notify: Callable[[str], None]  # called with each notification's payload
    # LISTEN is in place (again): what was sent while nobody listened was missed.
    on_listening: Callable[[], None]
    on_lost: Callable[[], None]
    # A probe was answered: notifications arrive in order before it, so none is pending.
    on_probe: Callable[[], None] = _nothing


async def listen_forever(dsn: str, subscription: Subscription) -> None:
    """Forever: LISTEN on the subscription's channel; reconnect whenever cut off.

    Nothing but cancellation ends this loop: whatever goes wrong, the listener logs it,
    waits a moment and reconnects, because without it changes would go unnoticed.
    """
    label = subscription.label
    has_warned = False
    while True:
        try:
            conn = await store.connect(dsn, application_name=APPLICATION_NAME)
        except store.StoreError as error:
            if not has_warned:  # once per outage, not once a second
                log.warning("%s: %s; retrying every %ss", label, error, RETRY_SECONDS)
                has_warned = True
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("%s: unexpected error while connecting; retrying", label)
        else:
            has_warned = False
            try:
                await listen_until_lost(conn, subscription)
            except store.UNAVAILABLE_ERRORS as error:
                log.warning("%s lost its connection (%s)", label, type(error).__name__)
            except Exception:  # noqa: BLE001 - see the docstring
                log.exception("%s: unexpected error; reconnecting", label)
            finally:
                subscription.on_lost()
                conn.terminate()
        await asyncio.sleep(RETRY_SECONDS)


async def listen_until_lost(conn: asyncpg.Connection, subscription: Subscription) -> None:
    """LISTEN on one connection until it is lost (or a probe fails)."""
    lost = asyncio.get_running_loop().create_future()
    conn.add_termination_listener(lambda _conn: lost.done() or lost.set_result(None))
    await conn.add_listener(subscription.channel, lambda *args: subscription.on_notify(args[-1]))
    subscription.on_listening()
    # The termination callback is not fired when the server vanishes without a word
    # (kill -9, network), so also probe now and then.
    while not lost.done():
        try:
            await asyncio.wait_for(asyncio.shield(lost), timeout=PROBE_SECONDS)
        except TimeoutError:
            await conn.fetchval("SELECT 1", timeout=PROBE_SECONDS)
            subscription.on_probe()
