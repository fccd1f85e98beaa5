"""The background loop that writes batches to the database, shared by the request log and
the token limiter: each gathers work in memory and flushes it here, off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def flush_forever(
    flush: Callable[[], Awaitable[None]], wakeup: asyncio.Event, interval: float, label: str
) -> None:
    """Call flush() at once when woken, else every `interval` seconds, until cancelled."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wakeup.wait(), interval)
        wakeup.clear()
        try:
            await flush()
        except Exception:  # the flusher must outlive any one bad batch
            log.exception("%s: flush failed; will try again", label)
