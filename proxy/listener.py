"""The gateway's one LISTEN connection: it outlives anything, reconnects, and probes for a
silent loss.

Auth (AUTH_CHANNEL: users or keys changed) and the token limiter (TOKEN_CHANNEL: another
gateway charged tokens) both hear the other gateways through it: each owner builds a
Subscription for its channel, and one connection LISTENs on all of them, so a gateway
holds one notification connection whatever it listens for. While that connection is down
no owner may trust what it cached, so every owner is told when listening starts and when
it stops, and each keeps its own state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from proxy import store

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
# How often the listener probes its connection; a silent loss is noticed within twice this.
PROBE_SECONDS = 2.0
# How the connection shows in pg_stat_activity, so an operator can tell it from the pool's.
APPLICATION_NAME = "llamagate listener"


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Subscription:
    """What one owner hears on its channel, and what it is told about the connection."""

    channel: str
    on_notify: Callable[[str], None]  # called with each notification's payload
    # LISTEN is in place (again): what was sent while nobody listened was missed.
    on_listening: Callable[[], None]
    on_lost: Callable[[], None]
    # A probe was answered: notifications arrive in order before it, so none is pending.
    on_probe: Callable[[], None] = _nothing


def name_of(subscriptions: Sequence[Subscription]) -> str:
    """The listener as log lines name it, with its channels."""
    return f"database listener ({', '.join(s.channel for s in subscriptions)})"


async def listen_forever(dsn: str, subscriptions: Sequence[Subscription]) -> None:
    """Forever: LISTEN on every subscription's channel, on one connection; reconnect
    whenever cut off.

    Nothing but cancellation ends this loop: whatever goes wrong, the listener logs it,
    waits a moment and reconnects, because without it changes would go unnoticed.
    """
    label = name_of(subscriptions)
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
                await listen_until_lost(conn, subscriptions)
            except store.UNAVAILABLE_ERRORS as error:
                log.warning("%s lost its connection (%s)", label, type(error).__name__)
            except Exception:  # noqa: BLE001 - see the docstring
                log.exception("%s: unexpected error; reconnecting", label)
            finally:
                for subscription in subscriptions:
                    subscription.on_lost()
                conn.terminate()
        await asyncio.sleep(RETRY_SECONDS)


async def listen_until_lost(
    conn: asyncpg.Connection, subscriptions: Sequence[Subscription]
) -> None:
    """LISTEN on one connection until it is lost (or a probe fails)."""
    lost = asyncio.get_running_loop().create_future()
    conn.add_termination_listener(lambda _conn: lost.done() or lost.set_result(None))
    for subscription in subscriptions:
        await conn.add_listener(subscription.channel, deliver_to(subscription))
    # Told only once every LISTEN is in place: one that fails then tells no owner it is heard.
    for subscription in subscriptions:
        subscription.on_listening()
    # The termination callback is not fired when the server vanishes without a word
    # (kill -9, network), so also probe now and then.
    while not lost.done():
        try:
            await asyncio.wait_for(asyncio.shield(lost), timeout=PROBE_SECONDS)
        except TimeoutError:
            await conn.fetchval("SELECT 1", timeout=PROBE_SECONDS)
            for subscription in subscriptions:
                subscription.on_probe()


def deliver_to(subscription: Subscription) -> Callable[..., None]:
    """asyncpg's listener callback (connection, pid, channel, payload) for one owner."""
    # A function of its own: a lambda made in the loop would see only its last subscription.
    return lambda *args: subscription.on_notify(args[-1])
