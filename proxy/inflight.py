"""Requests admitted past auth, by key id, so that a revocation can reach them.

A request joins when it enters the queue and leaves when its answer is done. When its key
or user dies meanwhile, `end` marks it with the reason: a request still waiting is then
refused when its turn comes, and one already relaying has its relay task cancelled (the
task's exit closes the upstream response, so the backend stops generating). Which keys
died is decided elsewhere (proxy/revocation.py); this module only keeps the books.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass(eq=False)
class InFlight:
    """One admitted request: whose it is, and why it was ended, if it was."""

    key_id: str
    username: str
    end_reason: str | None = None  # a code such as key_revoked; None while it may go on
    end_message: str = ""
    relay: asyncio.Task | None = field(default=None, repr=False)
    response: web.StreamResponse | None = field(default=None, repr=False)

    @property
    def refusal(self) -> str:
        """The reason code and message, as the client and the request log see them."""
        return f"{self.end_reason}: {self.end_message}"


class InFlightRequests:
    """The books: admitted requests by key id."""

    def __init__(self) -> None:
        self._by_key: dict[str, set[InFlight]] = {}

    def add(self, key_id: str, username: str) -> InFlight:
        entry = InFlight(key_id, username)
        self._by_key.setdefault(key_id, set()).add(entry)
        return entry

    def remove(self, entry: InFlight) -> None:
        entries = self._by_key.get(entry.key_id)
        if entries is None:
            return
        entries.discard(entry)
        if not entries:
            del self._by_key[entry.key_id]

    def keys(self) -> list[tuple[str, str]]:
        """(key id, username) of every key with a request in flight."""
        return [(key_id, next(iter(entries)).username) for key_id, entries in self._by_key.items()]

    def count(self) -> int:
        return sum(len(entries) for entries in self._by_key.values())

    def end(self, key_id: str, reason: str, message: str) -> int:
        """Mark every request of this key as ended, cancel the ones relaying; how many."""
        entries = self._by_key.get(key_id, ())
        for entry in entries:
            if entry.end_reason is None:
                entry.end_reason, entry.end_message = reason, message
                if entry.relay is not None:
                    entry.relay.cancel()
        return len(entries)


async def run_unless_ended(
    entry: InFlight, relay: Coroutine[Any, Any, web.StreamResponse]
) -> web.StreamResponse | None:
    """Run the relay in a task of its own that `end` can cancel; its answer, or None if ended.

    A task of its own, because cancelling the request's handler task would look like the
    client hanging up. Cancellation of the caller (the client did hang up) still reaches
    the relay, since awaiting a task passes cancellation on to it.
    """
    task = asyncio.create_task(relay)
    entry.relay = task
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if entry.end_reason is None or (current is not None and current.cancelling()):
            raise
        return None
    finally:
        entry.relay = None
