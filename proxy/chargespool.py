"""Token charges that could not reach the database, kept on local disk until it answers.

The token limiter's counterpart of the request log's spool (proxy/spool.py), beside it
and with the same discipline: an append-only file of JSON lines, one line per flush that
failed, and next to it `<file>.offset`, the byte offset up to which lines are in the
database, rewritten atomically after each replayed chunk. Once the offset reaches the
end, both files are removed. A line is

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

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

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


class ChargeSpool:
    """The charge spool file and its replay offset; see the module docstring."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.offset_path = path.with_name(path.name + ".offset")
        self.max_bytes = max_bytes
        self._executor: ThreadPoolExecutor | None = None

    async def _on_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chargespool")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        """Let the spool's thread end (after its queued work)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def append(self, batch: ChargeBatch) -> bool:
        """Write one batch durably; False if it does not fit under max_bytes.
        Raises OSError if the disk refuses it."""
        return await self._on_thread(self._append, encode_batch(batch))

    def _append(self, line: bytes) -> bool:
        _make_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            # Ends a line torn by a crash, so that it does not swallow this one.
            prefix = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
            if size + len(prefix) + len(line) > self.max_bytes:
                return False
            os.write(fd, prefix + line)
            os.fsync(fd)
            return True
        finally:
            os.close(fd)

    async def has_batches(self) -> bool:
        """Batches not yet replayed; False if there is no file."""
        return await self._on_thread(self._has_batches)

    def _has_batches(self) -> bool:
        try:
            return self.path.stat().st_size > self._read_offset()
        except (FileNotFoundError, NotADirectoryError):
            return False

    async def read_chunk(self, max_batches: int) -> ChargeChunk:
        """The next batches after the committed offset. Raises OSError if unreadable."""
        return await self._on_thread(self._read_chunk, max_batches)

    def _read_chunk(self, max_batches: int) -> ChargeChunk:
        chunk = ChargeChunk(end=self._read_offset())
        with open(self.path, "rb") as spool:
            spool.seek(chunk.end)
            while len(chunk.batches) < max_batches:
                line = spool.readline()
                if not line:
                    break
                chunk.end += len(line)
                if not line.strip():
                    continue  # the newline that ended a torn line
                if not line.endswith(b"\n"):
                    # Appends run on this same thread, so none is half done now: the
                    # line was torn by a crash, and its charges are lost with it.
                    log.warning(
                        "token limits: skipping a torn charge spool line at byte %d", chunk.end
                    )
                    continue
                batch = decode_batch(line)
                if batch is None:
                    log.warning(
                        "token limits: skipping an unreadable charge spool line ending at byte %d",
                        chunk.end,
                    )
                    continue
                chunk.batches.append(batch)
        return chunk

    async def commit(self, offset: int) -> bool:
        """Record batches up to offset as saved; True if the spool is now empty (and removed)."""
        return await self._on_thread(self._commit, offset)

    def _commit(self, offset: int) -> bool:
        if offset >= self.path.stat().st_size:
            # The offset file first: a crash in between leaves a spool without an
            # offset, replayed again in full and refused by batch id, never an offset
            # that would skip the lines of a later spool.
            self.offset_path.unlink(missing_ok=True)
            self.path.unlink()
            return True
        partial = self.offset_path.with_name(self.offset_path.name + ".new")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, str(offset).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, self.offset_path)
        return False

    def _read_offset(self) -> int:
        try:
            offset = int(self.offset_path.read_text() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            # Replaying from the start is safe: the batch ids refuse what was applied.
            log.warning(
                "token limits: %s is unreadable; replaying from the start", self.offset_path
            )
            return 0
        size = self.path.stat().st_size if self.path.exists() else 0
        return offset if 0 <= offset <= size else 0  # an offset of an older, longer spool


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


def _make_private_dir(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask
