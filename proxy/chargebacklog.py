"""Token charges the database did not take, parked on disk, and their replay once it does.

The token limiter (proxy/tokenlimit.py) parks a flush's charges here when the database
fails them, and at shutdown what is still unsent, so that they outlive the gateway as the
request rows of the same requests do. It replays them before it sends anything new:
oldest first, a chunk of batches per transaction, at most REPLAY_SECONDS per flush. Each
batch is applied once (its id, proxy/tokenstore.py replay_charges); once a chunk's offset
is saved, its ids are dropped from the database again. The file is proxy/chargespool.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import date

from proxy.chargespool import ChargeBatch, ChargeChunk, ChargeSpool

log = logging.getLogger(__name__)

REPLAY_SECONDS = 1.0  # per flush: then the new charges and reads get their turn
CHUNK_BATCHES = 500  # batches per transaction (a flush's charges each)

ReplayBatches = Callable[[Sequence[ChargeBatch]], Awaitable[int]]
ForgetBatches = Callable[[Sequence[str]], Awaitable[None]]
CountBatches = Callable[[int], None]


def _ignore(count: int) -> None:
    """No counter: what a backlog outside the gateway (a test's) reports to."""


class ChargeBacklog:
    """Parks unsent charges in the spool and replays them; see the module docstring."""

    def __init__(
        self,
        spool: ChargeSpool,
        replay_batches: ReplayBatches,
        forget_batches: ForgetBatches,
        clock: Callable[[], float] = time.monotonic,
        on_parked: CountBatches = _ignore,
        on_replayed: CountBatches = _ignore,
    ) -> None:
        self.spool = spool
        self.replay_batches = replay_batches
        self.forget_batches = forget_batches
        self.clock = clock
        self.on_parked = on_parked  # /metrics counters (proxy/metrics.py)
        self.on_replayed = on_replayed
        self.is_pending: bool | None = None  # None: not looked yet (a past run may have left some)
        self.error: str | None = None  # the last disk failure, reported once and in /readyz

    def settled(self) -> None:
        """The charges held in memory reached the database: nothing left to report."""
        self.error = None

    async def has_pending(self) -> bool:
        """Whether charges wait in the spool."""
        if self.is_pending is None:
            try:
                self.is_pending = await self.spool.has_batches()
            except OSError as error:
                self._report(f"cannot read the charge spool {self.spool.path}: {error.strerror}")
                return True  # let the replay try, and report what it finds
        return self.is_pending

    async def park(self, at: float, charges: dict[tuple[str, date], int]) -> bool:
        """Write charges to the spool durably; False if they must stay in memory (the
        spool is full, LLAMA_PROXY_SPOOL_MAX_MB, or the disk refuses them)."""
        batch = ChargeBatch.new(at, charges)
        if not batch.charges:
            return True
        try:
            is_taken = await self.spool.append(batch)
        except OSError as error:
            self._report(f"cannot write the charge spool {self.spool.path}: {error.strerror}")
            return False
        if not is_taken:
            self._report(
                f"the charge spool {self.spool.path} is full ({self.spool.max_bytes // 2**20} "
                f"MiB, LLAMA_PROXY_SPOOL_MAX_MB)"
            )
            return False
        self.error = None
        self.is_pending = True
        self.on_parked(1)
        return True

    async def replay(self) -> bool:
        """Replay chunks, oldest first: True once the spool is empty; False if the disk
        fails or this flush's share of time is spent. Database errors are raised."""
        deadline = self.clock() + REPLAY_SECONDS
        while True:
            chunk = await self._read_chunk()
            if chunk is None:
                return False
            if chunk.batches:
                await self.replay_batches(chunk.batches)
            is_empty = await self._commit(chunk.end)
            if is_empty is None:
                return False
            if chunk.batches:
                self.on_replayed(len(chunk.batches))
                await self._forget(chunk.batches)
            if is_empty:
                self.is_pending = False
                log.warning("token limits: replayed the charge spool %s", self.spool.path)
                return True
            if self.clock() > deadline:
                return False

    def close(self) -> None:
        self.spool.close()

    async def _read_chunk(self) -> ChargeChunk | None:
        try:
            return await self.spool.read_chunk(CHUNK_BATCHES)
        except OSError as error:
            self._report(f"cannot read the charge spool {self.spool.path}: {error.strerror}")
            return None

    async def _commit(self, offset: int) -> bool | None:
        """Save the offset; True if the spool is now empty, None if the disk refuses (the
        chunk is then sent again later, and refused by its ids)."""
        try:
            return await self.spool.commit(offset)
        except OSError as error:
            self._report(f"cannot save the charge spool's offset: {error.strerror}")
            return None

    async def _forget(self, batches: Sequence[ChargeBatch]) -> None:
        try:
            await self.forget_batches([batch.batch_id for batch in batches])
        except Exception as error:  # only leaves a few ids behind, for good: harmless
            log.debug("token limits: replayed batch ids not dropped: %r", error)

    def _report(self, message: str) -> None:
        if message != self.error:  # once per failure, not at every flush
            log.error("token limits: %s; charges are kept in memory meanwhile", message)
        self.error = message
