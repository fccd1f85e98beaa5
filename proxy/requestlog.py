"""The request log: one row per request in llama_requests, written off the request path.

Requests only append a tuple to a buffer. A background task writes the buffer in
batches (one INSERT ... SELECT unnest per batch). If PostgreSQL is unreachable the batch
is appended to a local spool file (JSON lines, fsynced) and replayed, oldest first,
once the database answers again; the request_id is unique, so a replay that is cut
short and repeated inserts nothing twice. Closing flushes what is left.

If the spool cannot be written either (a full or read-only disk), rows wait in memory,
up to MAX_BUFFERED_ROWS; beyond that the oldest are dropped, counted and reported, so
that a long outage cannot exhaust the gateway's memory.
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
# About 1 KB each: tens of MB at most, and hours of traffic for one model.
MAX_BUFFERED_ROWS = 50_000
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
            message = f"cannot write the spool file {self.path}: {error.strerror}"
            if message != self.error:  # once per failure, not at every flush
                log.error("request log: %s; rows are kept in memory meanwhile", message)
            self.error = message
            return False
        self.error = None
        return True

    def has_rows(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def read_batches(self, size: int) -> list[list[Row]]:
        """Every complete row in the file, in batches; a torn last line is skipped.

        Raises OSError if the file cannot be read.
        """
        rows: list[Row] = []
        with open(self.path, encoding="utf-8") as spool:
            for number, line in enumerate(spool, 1):
                try:
                    rows.append(_decode(json.loads(line)))
                except (ValueError, TypeError):
                    log.warning("request log: skipping unreadable spool line %d", number)
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    def remove(self) -> None:
        """Delete the replayed file; if that fails, its rows are replayed again (no harm)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.error("request log: cannot remove the replayed spool %s: %s", self.path, error)


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
        self.dropped = 0  # rows lost because neither the database nor the disk took them
        self.reported_dropped = 0

    @property
    def problem(self) -> str | None:
        """Why rows cannot be saved right now, for /readyz; None when all is well."""
        error = self.spool.error
        if error and self.dropped:
            error += f"; {self.dropped} rows dropped (over {MAX_BUFFERED_ROWS} held in memory)"
        return error

    def add(self, row: Row) -> None:
        """Queue one row; never blocks, never fails."""
        self.buffer.append(row)
        if len(self.buffer) >= BATCH_MAX_ROWS:
            self.wakeup.set()
        self._cap_buffer()

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
        try:
            is_saved = await self._write(rows)
        except BaseException:
            # Cancelled at shutdown, or a bug: the rows go back, for close() or the next
            # flush. Some may be written twice; their request_id makes that harmless.
            self.buffer[:0] = rows
            raise
        if is_saved and not self.buffer:
            self.spool.error = None  # everything reached the database: nothing to report
        self._report_dropped()

    async def _write(self, rows: list[Row]) -> bool:
        """Write rows (after the spool); False if some had to be kept for later."""
        if self.spool.has_rows() and not await self._replay_spool():
            self._keep(rows)
            return False
        for start in range(0, len(rows), BATCH_MAX_ROWS):
            batch = rows[start : start + BATCH_MAX_ROWS]
            if not await self._insert(batch):
                self._keep(rows[start:])
                return False
        return True

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
        try:
            batches = self.spool.read_batches(BATCH_MAX_ROWS)
        except OSError as error:
            self.spool.error = f"cannot read the spool file {self.spool.path}: {error.strerror}"
            log.error("request log: %s; new rows wait behind it", self.spool.error)
            return False
        for batch in batches:
            if not await self._insert(batch):
                return False
        log.warning("request log: replayed the spool %s into the database", self.spool.path)
        self.spool.remove()
        return True

    def _keep(self, rows: list[Row]) -> None:
        # On disk if possible; otherwise back into memory, to be tried again.
        if rows and not self.spool.append(rows):
            self.buffer[:0] = rows
            self._cap_buffer()

    def _cap_buffer(self) -> None:
        excess = len(self.buffer) - MAX_BUFFERED_ROWS
        if excess > 0:
            del self.buffer[:excess]  # the oldest go; the newest are the likeliest asked about
            self.dropped += excess

    def _report_dropped(self) -> None:
        # Once per flush, not once per request: a long outage must not flood the log.
        if self.dropped > self.reported_dropped:
            log.error(
                "request log: dropped %d rows (%d in all): neither the database nor the "
                "spool file takes them, and at most %d are held in memory",
                self.dropped - self.reported_dropped,
                self.dropped,
                MAX_BUFFERED_ROWS,
            )
            self.reported_dropped = self.dropped

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
        return tuple(_storable(getattr(self, column)) for column in store.REQUEST_COLUMNS)


def _storable(value: object) -> object:
    """Text PostgreSQL takes, whatever a client put in its path or model name.

    A NUL or a lone surrogate (JSON's "\\ud800") would make the database refuse the
    whole batch, and with it the rows of every other request written alongside.
    """
    if not isinstance(value, str):
        return value
    return value.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
