"""Revocation reaches work already admitted: on every auth change, re-check the keys in flight.

Auth's part of the gateway's LISTEN connection calls `changed()` on each notification. One
query then asks the database about every key that has a request waiting or relaying on
this gateway (none: no query), and the requests of keys that were revoked or deleted, or
whose user was disabled or deleted, are ended (proxy/inflight.py). A burst of
notifications costs one check running and at most one more queued behind it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from proxy import store
from proxy.inflight import InFlightRequests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyState:
    """What the database says now about a key that has requests in flight."""

    key_id: str
    username: str
    has_key: bool
    has_user: bool
    is_revoked: bool
    is_disabled: bool


async def fetch_key_states(pool: asyncpg.Pool, keys: list[tuple[str, str]]) -> list[KeyState]:
    """The state of each (key id, username), in one round trip."""
    rows = await pool.fetch(
        """
        SELECT w.key_id, w.username,
               k.id IS NOT NULL AS has_key, u.id IS NOT NULL AS has_user,
               coalesce(k.revoked_at IS NOT NULL, false) AS is_revoked,
               coalesce(ku.is_disabled, false) AS is_disabled
        FROM unnest($1::text[], $2::text[]) AS w(key_id, username)
        LEFT JOIN api_keys AS k ON k.key_id = w.key_id
        LEFT JOIN users AS ku ON ku.id = k.user_id
        LEFT JOIN users AS u ON u.username = w.username
        """,
        [key_id for key_id, _ in keys],
        [username for _, username in keys],
    )
    return [KeyState(**dict(row)) for row in rows]


def reason_to_end(state: KeyState) -> tuple[str, str] | None:
    """(reason code, message) if requests of this key must end now, else None."""
    if not state.has_key:
        if not state.has_user:
            return "user_deleted", f"user {state.username!r} was deleted"
        return "key_deleted", f"API key {state.key_id} was deleted"
    if state.is_revoked:
        return "key_revoked", f"API key {state.key_id} was revoked"
    if state.is_disabled:
        return "user_disabled", f"user {state.username!r} was disabled"
    return None  # expiry is not revocation: a request admitted in time may finish


class RevocationWatch:
    """Ends the requests in flight whose key or user died; driven by auth notifications."""

    def __init__(self, pool: asyncpg.Pool, inflight: InFlightRequests) -> None:
        self.pool = pool
        self.inflight = inflight
        self._task: asyncio.Task | None = None
        self._is_dirty = False

    def changed(self) -> None:
        """Called on each notification: check now, or once more after the running check."""
        if self._task is not None and not self._task.done():
            self._is_dirty = True
            return
        self._task = asyncio.get_running_loop().create_task(self._check_until_clean())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _check_until_clean(self) -> None:
        while True:
            self._is_dirty = False
            await self.check()
            if not self._is_dirty:
                return

    async def check(self) -> int:
        """End the requests of dead keys; how many were ended."""
        keys = self.inflight.keys()
        if not keys:
            return 0
        try:
            states = await fetch_key_states(self.pool, keys)
        except store.UNAVAILABLE_ERRORS as error:
            # The next notification, or the re-check when a turn is granted, catches up.
            log.warning("revocation: cannot re-check keys in flight (%s)", type(error).__name__)
            return 0
        except Exception:  # noqa: BLE001 - a failed check must not stop later ones
            log.exception("revocation: re-checking the keys in flight failed")
            return 0
        ended = 0
        for state in states:
            reason = reason_to_end(state)
            if reason is not None:
                count = self.inflight.end(state.key_id, *reason)
                log.info("revocation: ended %d request(s) of key %s: %s", count, *reason[:1])
                ended += count
        return ended
