"""Token charges that could not reach the database, kept on local disk until it answers.

The token limiter's counterpart of the request log's spool (proxy/spool.py), beside it
and with the same discipline: an append-only file of JSON lines, one line per flush that
failed, and next to it `<file>.offset`, the byte offset up to which lines are in the
database, rewritten atomically after each replayed chunk. Once the offset reaches the
end, both files are removed (proxy/linefile.py keeps the file, its offset and its
thread for both spools). A line is

    {"id": "<batch id>", "at": <epoch seconds>, "charges": [["alice", "2026-11-30", 12], ...]}

The id makes a replay exactly-once: the database records it in the transaction that
applies the charges (proxy/tokenstore.py, replay_charges), so a chunk sent again after a
crash between that commit and the offset is refused, not counted twice.

One fsync covers one line. The file is capped at `max_bytes`; a batch that does not fit
is refused and the caller keeps it in memory (charges are summed per user and day, so
memory stays small). A line torn by a crash is skipped alone: the next append first ends
it. All file work runs on one thread of the spool's own, in order, off the event loop.
Files are created 0600 and a missing directory 0700: the lines name users.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from proxy.linefile import LineFile, append_within

log = logging.getLogger(__name__)

Charge = tuple[str, date, int]  # user, UTC day, tokens


@dataclass(frozen=True)
class ChargeBatch:
    """One flush's charges, under an id that is never reused."""

    batch_id: str
    at: float  # when they were charged (this gateway's clock), for the minute window
    charges: tuple[Charge, ...]

    @classmethod
    def new(cls, at: float, charges: dict[tuple[str, date], int]) -> ChargeBatch:
        items = tuple((user, day, tokens) for (user, day), tokens in charges.items() if tokens)
        return cls(uuid.uuid4().hex, at, items)


@dataclass
class ChargeChunk:
    """Batches read from the spool, and the offset just past them (to commit once saved)."""

    batches: list[ChargeBatch] = field(default_factory=list)
    end: int = 0


def charge_spool_path(request_spool: Path) -> Path:
    """Beside the request log's spool, named after it: two gateways never share one."""
    return request_spool.with_name(f"{request_spool.stem}.charges.jsonl")


class ChargeSpool(LineFile):
    """The charge spool file and its replay offset; see the module docstring."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        super().__init__(path, label="token limits", kind="charge spool")
        self.max_bytes = max_bytes

    async def append(self, batch: ChargeBatch) -> bool:
        """Write one batch durably; False if it does not fit under max_bytes.
        Raises OSError if the disk refuses it."""
        lines = [encode_batch(batch)]
        return await self.on_thread(append_within, self.path, lines, self.max_bytes) == 1

    async def has_batches(self) -> bool:
        """Batches not yet replayed; False if there is no file."""
        return await self.on_thread(self.has_lines)

    async def read_chunk(self, max_batches: int) -> ChargeChunk:
        """The next batches after the committed offset. Raises OSError if unreadable."""
        return await self.on_thread(self._read_chunk, max_batches)

    def _read_chunk(self, max_batches: int) -> ChargeChunk:
        lines, end = self.read_lines(max_batches)
        chunk = ChargeChunk(end=end)
        for line, line_end in lines:
            batch = decode_batch(line)
            if batch is None:
                log.warning(
                    "token limits: skipping an unreadable charge spool line ending at byte %d",
                    line_end,
                )
                continue
            chunk.batches.append(batch)
        return chunk


def encode_batch(batch: ChargeBatch) -> bytes:
    charges = [[user, day.isoformat(), tokens] for user, day, tokens in batch.charges]
    line = json.dumps({"id": batch.batch_id, "at": batch.at, "charges": charges})
    return (line + "\n").encode()


def decode_batch(line: bytes) -> ChargeBatch | None:
    """The batch of one spool line; None if the line is not one."""
    try:
        fields = json.loads(line)
        batch_id, at = fields["id"], float(fields["at"])
        charges = tuple(
            (str(user), date.fromisoformat(day), int(tokens))
            for user, day, tokens in fields["charges"]
        )
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(batch_id, str) or not batch_id or any(c[2] <= 0 for c in charges):
        return None
    return ChargeBatch(batch_id, at, charges)
