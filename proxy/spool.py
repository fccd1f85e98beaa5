"""The request log's spool: rows that could not reach the database, kept on local disk.

An append-only file of JSON lines, one row per line, and next to it `<spool>.offset`:
the byte offset up to which rows are in the database, rewritten (atomically) after each
replayed chunk is committed. A replay cut short, by an outage or a crash, resumes there.
A crash between a chunk's INSERT and its offset sends that one chunk again, and the
table's unique request_id (ON CONFLICT DO NOTHING) drops the repeats: each row lands
exactly once. Once the offset reaches the end, both files are removed.

All file work runs on one thread of the spool's own, in order, so the event loop never
waits for the disk, and an append never interleaves with a read. Replayed lines are
decoded on the loop in small slices (see read_chunk). One fsync
covers a whole batch of rows. The file is capped at `max_bytes`: rows that do not fit
are refused, and the caller counts them. A line torn by a crash is skipped alone: the
next append first ends it, so that it cannot swallow the row written after it.

Files are created 0600 and a missing directory 0700: the rows name users and clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from proxy import store

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
    _make_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a file left by an older version may be wider
        size = os.fstat(fd).st_size
        # Ends a line torn by a crash, so that it does not swallow the next row.
        prefix = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        lines, taken = [prefix], len(prefix)
        for row in rows:
            line = (json.dumps(_encode(row)) + "\n").encode()
            if max_bytes is not None and size + taken + len(line) > max_bytes:
                break
            lines.append(line)
            taken += len(line)
        if taken:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        return len(lines) - 1
    finally:
        os.close(fd)


def _make_private_dir(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask


class Spool:
    """The spool file and its replay offset; see the module docstring."""

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.offset_path = path.with_name(path.name + ".offset")
        self.rejected_path = path.with_suffix(".rejected")
        self.max_bytes = max_bytes
        self.error: str | None = None  # the last disk failure, for /readyz
        self.is_full = False  # the last append hit max_bytes
        self._executor: ThreadPoolExecutor | None = None

    async def _on_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        """Let the spool's thread end (after its queued work)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def append(self, rows: Sequence[Row]) -> int | None:
        """Write rows durably; how many were refused for the size cap, None if the disk
        refused them all (then `error` says why)."""
        try:
            taken = await self._on_thread(append_lines, self.path, rows, self.max_bytes)
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
        await self._on_thread(append_lines, self.rejected_path, rows)
        return self.rejected_path

    async def has_rows(self) -> bool:
        """Rows not yet replayed; False if there is no file."""
        return await self._on_thread(self._has_rows)

    def _has_rows(self) -> bool:
        try:
            return self.path.stat().st_size > self._read_offset()
        except (FileNotFoundError, NotADirectoryError):  # no spool file, so no rows
            return False

    async def read_chunk(self, max_rows: int) -> Chunk:
        """The next rows after the committed offset. Raises OSError if unreadable.

        The thread only reads bytes; JSON is decoded here, DECODE_SLICE lines at a time
        with a yield in between. A thread busy decoding would hold the GIL, and the
        event loop would wait for it at every socket call, longest on a busy machine.
        """
        lines, end = await self._on_thread(self._read_lines, max_rows)
        chunk = Chunk(end=end)
        for start in range(0, len(lines), DECODE_SLICE):
            if start:
                await asyncio.sleep(0)
            for line, line_end in lines[start : start + DECODE_SLICE]:
                row = _decode_line(line, line_end)
                if row is not None:
                    chunk.rows.append(row)
        return chunk

    def _read_lines(self, max_rows: int) -> tuple[list[tuple[bytes, int]], int]:
        """Up to max_rows whole lines after the offset, each with the offset past it."""
        end = self._read_offset()
        lines: list[tuple[bytes, int]] = []
        with open(self.path, "rb") as spool:
            spool.seek(end)
            while len(lines) < max_rows:
                line = spool.readline()
                if not line:
                    break
                end += len(line)
                if not line.strip():
                    continue  # the newline that ended a torn line
                if not line.endswith(b"\n"):
                    # Appends run on this same thread, so none is half done now: the
                    # line was torn by a crash.
                    log.warning("request log: skipping a torn spool line at byte %d", end)
                    continue
                lines.append((line, end))
        return lines, end

    async def commit(self, offset: int) -> bool:
        """Record rows up to offset as saved; True if the spool is now empty (and removed)."""
        return await self._on_thread(self._commit, offset)

    def _commit(self, offset: int) -> bool:
        if offset >= self.path.stat().st_size:
            # The offset file first: a crash in between leaves a spool without an
            # offset, replayed again in full (harmless), never an offset that would
            # skip the rows of a later spool.
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
            log.warning("request log: %s is unreadable; replaying from the start", self.offset_path)
            return 0
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        return offset if 0 <= offset <= size else 0  # an offset of an older, longer spool


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
