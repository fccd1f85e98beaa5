"""The request log's spool: rows that could not reach the database, kept on local disk.

An append-only file of JSON lines, one row per line, and next to it `<spool>.offset`:
the byte offset up to which rows are in the database, rewritten (atomically) after each
replayed chunk is committed. A replay cut short, by an outage or a crash, resumes there.
A crash between a chunk's INSERT and its offset sends that one chunk again, and the
table's unique request_id (ON CONFLICT DO NOTHING) drops the repeats: each row lands
exactly once. Once the offset reaches the end, both files are removed.

The file, its offset, its thread and torn lines are proxy/linefile.py's. Replayed lines
are decoded on the loop in small slices (see read_chunk). One fsync covers a whole batch
of rows. The file is capped at `max_bytes`: rows that do not fit
are refused, and the caller counts them. A line torn by a crash is skipped alone: the
next append first ends it, so that it cannot swallow the row written after it.

Files are created 0600 and a missing directory 0700: the rows name users and clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from proxy import store
from proxy.linefile import LineFile, append_within

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DECODE_SLICE = 100  # rows decoded on the event loop between two yields (about 1 ms)
CREATED_AT = store.REQUEST_COLUMNS.index("created_at")

Row = tuple


@dataclass
class Chunk:
    """Rows read from the spool, and the offset just past them (to commit once saved)."""

    rows: list[Row] = field(default_factory=list)
    end: int = 0


def append_lines(path: Path, rows: Sequence[Row], max_bytes: int | None = None) -> int:
    """Append rows to a JSON-lines file durably (one fsync); how many fitted under max_bytes.

    Raises OSError if the disk refuses. Blocking: call it on the spool's thread.
    """
    lines = ((json.dumps(_encode(row)) + "\n").encode() for row in rows)
    return append_within(path, lines, max_bytes)


class Spool(LineFile):
    """The spool file and its replay offset; see the module docstring."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        super().__init__(path, label="request log", kind="spool")
        self.rejected_path = path.with_suffix(".rejected")
        self.max_bytes = max_bytes
        self.error: str | None = None  # the last disk failure, for /readyz
        self.is_full = False  # the last append hit max_bytes

    async def append(self, rows: Sequence[Row]) -> int | None:
        """Write rows durably; how many were refused for the size cap, None if the disk
        refused them all (then `error` says why)."""
        try:
            taken = await self.on_thread(append_lines, self.path, rows, self.max_bytes)
        except OSError as error:
            message = f"cannot write the spool file {self.path}: {error.strerror}"
            if message != self.error:  # once per failure, not at every flush
                log.error("request log: %s; rows are kept in memory meanwhile", message)
            self.error = message
            return None
        self.is_full = taken < len(rows)
        self.error = None
        if self.is_full:
            self.error = (
                f"the spool file {self.path} is full ({self.max_bytes // 2**20} MiB, "
                f"LLAMA_PROXY_SPOOL_MAX_MB); new rows are dropped until the database returns"
            )
        return len(rows) - taken

    async def set_aside(self, rows: Sequence[Row]) -> Path:
        """Append rows the database refused for good to the .rejected file; OSError if not."""
        await self.on_thread(append_lines, self.rejected_path, rows)
        return self.rejected_path

    async def has_rows(self) -> bool:
        """Rows not yet replayed; False if there is no file."""
        return await self.on_thread(self.has_lines)

    async def read_chunk(self, max_rows: int) -> Chunk:
        """The next rows after the committed offset. Raises OSError if unreadable.

        The thread only reads bytes; JSON is decoded here, DECODE_SLICE lines at a time
        with a yield in between. A thread busy decoding would hold the GIL, and the
        event loop would wait for it at every socket call, longest on a busy machine.
        """
        lines, end = await self.on_thread(self.read_lines, max_rows)
        chunk = Chunk(end=end)
        for start in range(0, len(lines), DECODE_SLICE):
            if start:
                await asyncio.sleep(0)
            for line, line_end in lines[start : start + DECODE_SLICE]:
                row = _decode_line(line, line_end)
                if row is not None:
                    chunk.rows.append(row)
        return chunk


def _encode(row: Row) -> list:
    encoded = list(row)
    encoded[CREATED_AT] = row[CREATED_AT].isoformat()
    return encoded


def _decode_line(line: bytes, end: int) -> Row | None:
    try:
        values = json.loads(line)
        if len(values) == len(store.REQUEST_COLUMNS) - 1:
            values.append(1)  # spooled before repeat_count existed: one request
        if len(values) != len(store.REQUEST_COLUMNS):
            raise ValueError("wrong number of columns")
        values[CREATED_AT] = datetime.fromisoformat(values[CREATED_AT])
    except (ValueError, TypeError, KeyError, IndexError):
        log.warning("request log: skipping an unreadable spool line ending at byte %d", end)
        return None
    return tuple(values)
