"""The shared members of the pool, as llama_backends lists them, kept fresh on this gateway.

Every change of the table notifies BACKENDS_CHANNEL (migration m010's trigger), so the
gateway reloads the whole list, a few rows, on each notification: a burst of changes costs
one reload (RELOAD_DEBOUNCE_SECONDS). While the LISTEN connection is down nothing is
heard, so the list is reloaded each time listening starts again.

Each member's bearer key is sealed in the database (proxy/sealing.py); a member whose key
this gateway cannot open is left out, with one log line that names the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from proxy import store
from proxy.listener import Subscription
from proxy.migrations import BACKENDS_CHANNEL
from proxy.sealing import SealingError, unseal

log = logging.getLogger(__name__)

RELOAD_DEBOUNCE_SECONDS = 0.05
RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Member:
    """One row of llama_backends, with its key opened."""

    member_id: int
    name: str
    url: str
    concurrency: int
    key: str
    state: str  # active, draining or refused
    model: str = ""


async def load_members(pool: asyncpg.Pool, secret: str) -> tuple[list[Member], list[str]]:
    """The members whose keys open, and one problem line per member whose key does not."""
    rows = await pool.fetch(
        "SELECT id, name, url, concurrency, sealed_key, state, model FROM llama_backends "
        "ORDER BY id"
    )
    members, problems = [], []
    for row in rows:
        try:
            key = unseal(secret, row["name"], row["url"], row["sealed_key"])
        except SealingError as error:
            problems.append(f"shared backend {row['name']!r} left out of the pool: {error}")
            continue
        members.append(
            Member(
                row["id"],
                row["name"],
                row["url"].rstrip("/"),
                row["concurrency"],
                key,
                row["state"],
                row["model"],
            )
        )
    return members, problems


class Registry:
    """Loads the members and hands each new list to `on_members`; reloads when told."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        secret: str,
        on_members: Callable[[Sequence[Member]], None],
        debounce: float = RELOAD_DEBOUNCE_SECONDS,
    ) -> None:
        self.pool = pool
        self.secret = secret
        self.on_members = on_members
        self.debounce = debounce
        self.loaded = 0  # reloads done, for tests and logs
        self._reload: asyncio.Task[None] | None = None
        self._is_stale = False
        self._told: set[str] = set()  # problems already logged: once each, not every reload

    def subscription(self) -> Subscription:
        """The registry's part of the gateway's LISTEN connection."""
        return Subscription(
            channel=BACKENDS_CHANNEL,
            on_notify=lambda _payload: self.reload_soon(),
            on_listening=self.reload_soon,
            on_lost=lambda: None,  # the list stays; slots need the database anyway
        )

    async def reload(self) -> bool:
        """Load the members now; False (and the old list kept) if the database is away."""
        try:
            members, problems = await load_members(self.pool, self.secret)
        except store.UNAVAILABLE_ERRORS as error:
            log.warning("cannot load the shared backends (%s); keeping the list", error)
            return False
        for problem in problems:
            if problem not in self._told:
                self._told.add(problem)
                log.error("%s", problem)
        self.loaded += 1
        self.on_members(members)
        return True

    def reload_soon(self) -> None:
        """Reload after a short pause, once for a burst of notifications."""
        # A change heard while a reload runs may have come after its SELECT: one more.
        self._is_stale = True
        if self._reload is None or self._reload.done():
            self._reload = asyncio.ensure_future(self._reload_while_stale())

    async def _reload_while_stale(self) -> None:
        while self._is_stale:
            await asyncio.sleep(self.debounce)
            self._is_stale = False
            if not await self.reload():
                self._is_stale = True
                await asyncio.sleep(RETRY_SECONDS)

    async def close(self) -> None:
        if self._reload is not None:
            self._reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload
