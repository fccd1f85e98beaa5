"""The request log: one row per request in llama_requests, written off the request path.

Requests only append a tuple to a buffer. A background task writes the buffer in
batches (one INSERT ... SELECT unnest per batch). If PostgreSQL is unreachable the batch
is appended to a local spool file (JSON lines, fsynced) and replayed, oldest first,
once the database answers again; the request_id is unique, so a replay that is cut
short and repeated inserts nothing twice. Closing flushes what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg

from proxy import store

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 0.2
BATCH_MAX_ROWS = 2000
CREATED_AT = store.REQUEST_COLUMNS.index("created_at")

Row = tuple
InsertRows = Callable[[Sequence[Row]], Awaitable[None]]


class Spool:
    """An append-only file of rows that could not be written, for replay."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None  # the last write failure, for /readyz

    def append(self, rows: Sequence[Row]) -> bool:
        """Write rows durably; False (and `error` set) if the disk refused."""
        lines = "".join(json.dumps(_encode(row)) + "\n" for row in rows)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as spool:
                spool.write(lines)
                spool.flush()
                os.fsync(spool.fileno())
        except OSError as error:
            self.error = f"cannot write the spool file {self.path}: {error.strerror}"
            log.error("request log: %s; %d rows are kept in memory", self.error, len(rows))
            return False
        self.error = None
        return True

    def has_rows(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def read_batches(self, size: int) -> list[list[Row]]:
        """Every complete row in the file, in batches; a torn last line is skipped."""
        rows: list[Row] = []
        with open(self.path, encoding="utf-8") as spool:
            for number, line in enumerate(spool, 1):
                try:
                    rows.append(_decode(json.loads(line)))
                except (ValueError, TypeError):
                    log.warning("request log: skipping unreadable spool line %d", number)
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _encode(row: Row) -> list:
    encoded = list(row)
    encoded[CREATED_AT] = row[CREATED_AT].isoformat()
    return encoded


def _decode(values: list) -> Row:
    if len(values) != len(store.REQUEST_COLUMNS):
        raise ValueError("wrong number of columns")
    values[CREATED_AT] = datetime.fromisoformat(values[CREATED_AT])
    return tuple(values)


class RequestLog:
    """Buffers rows and writes them in the background; see the module docstring."""

    def __init__(self, insert_rows: InsertRows, spool: Spool) -> None:
        self.insert_rows = insert_rows
        self.spool = spool
        self.buffer: list[Row] = []
        self.wakeup = asyncio.Event()
        self.is_database_down = False
        self.written = 0

    def add(self, row: Row) -> None:
        """Queue one row; never blocks, never fails."""
        self.buffer.append(row)
        if len(self.buffer) >= BATCH_MAX_ROWS:
            self.wakeup.set()

    async def run(self) -> None:
        """Flush forever, every FLUSH_INTERVAL_SECONDS or when the buffer fills."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), FLUSH_INTERVAL_SECONDS)
            self.wakeup.clear()
            try:
                await self.flush()
            except Exception:  # the flusher must outlive any one bad batch
                log.exception("request log: flush failed; will try again")

    async def flush(self) -> None:
        """Replay the spool if there is one, then write the buffer; spool it on failure."""
        rows, self.buffer = self.buffer, []
        if self.spool.has_rows() and not await self._replay_spool():
            self._keep(rows)
            return
        for start in range(0, len(rows), BATCH_MAX_ROWS):
            batch = rows[start : start + BATCH_MAX_ROWS]
            if not await self._insert(batch):
                self._keep(rows[start:])
                return

    async def close(self) -> None:
        """Write everything still buffered (to the spool if the database is down)."""
        await self.flush()
        if self.buffer:
            log.error("request log: %d rows could not be saved at shutdown", len(self.buffer))

    async def _insert(self, batch: Sequence[Row]) -> bool:
        try:
            await self.insert_rows(batch)
        except store.UNAVAILABLE_ERRORS as error:
            self._note_database(is_down=True, error=error)
            return False
        except asyncpg.PostgresError as error:
            # Rows the database refuses will be refused forever: set them aside for the
            # operator instead of blocking every later row behind them.
            rejected = Spool(self.spool.path.with_suffix(".rejected"))
            rejected.append(batch)
            log.error(
                "request log: %d rows refused (%s); kept in %s", len(batch), error, rejected.path
            )
            return True
        self._note_database(is_down=False)
        self.written += len(batch)
        return True

    async def _replay_spool(self) -> bool:
        for batch in self.spool.read_batches(BATCH_MAX_ROWS):
            if not await self._insert(batch):
                return False
        log.warning("request log: replayed the spool %s into the database", self.spool.path)
        self.spool.remove()
        return True

    def _keep(self, rows: list[Row]) -> None:
        # On disk if possible; otherwise back into memory, to be tried again.
        if rows and not self.spool.append(rows):
            self.buffer[:0] = rows

    def _note_database(self, is_down: bool, error: BaseException | None = None) -> None:
        if is_down and not self.is_database_down:
            log.warning(
                "request log: database unreachable (%s); spooling rows to %s",
                type(error).__name__,
                self.spool.path,
            )
        self.is_database_down = is_down


@dataclass
class RequestRecord:
    """What is known about one request so far; becomes one llama_requests row."""

    request_id: str
    created_at: datetime
    method: str
    path: str
    client_addr: str | None
    started: float
    request_bytes: int = 0
    username: str | None = None
    key_id: str | None = None
    status_code: int = 0
    queue_ms: float | None = None
    response_bytes: int = 0
    model: str | None = None
    stream: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    duration_ms: float = 0.0

    def to_row(self, finished: float) -> Row:
        """The row in store.REQUEST_COLUMNS order."""
        self.duration_ms = (finished - self.started) * 1000
        return tuple(getattr(self, column) for column in store.REQUEST_COLUMNS)
