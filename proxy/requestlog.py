"""The request log: one row per request in llama_requests, written off the request path.

Requests only append a tuple to a buffer. A background task writes the buffer in
batches: one INSERT per batch, its rows sent as one JSON text encoded a slice at a time
(proxy/logbatch.py), so that no step of the flush holds up a request for long. If
PostgreSQL is unavailable (proxy/outage.py), batches go to the spool (proxy/spool.py),
and while the database is known to be down the log only appends there: it tries the
database again with one cheap probe a second, not with the rows. Once the probe
answers, the spool is replayed, oldest first, in chunks read on the spool's thread, at
most REPLAY_SECONDS_PER_FLUSH per flush, so that the event loop keeps answering; new rows
wait in memory behind the replay. Rows the database refuses for good (data errors) are
set aside in a `.rejected` file. Closing flushes what is left, to the spool if need be.
Repeated anonymous refusals are folded into one row each second (proxy/refusals.py).

If the spool cannot be written either (a full or read-only disk), rows wait in memory,
up to MAX_BUFFERED_ROWS; beyond that, as beyond the spool's size cap, rows are dropped,
counted (on_dropped feeds /metrics) and reported, so that a long outage cannot exhaust
the gateway's memory or disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from proxy import store
from proxy.flushloop import flush_forever
from proxy.outage import Failure, classify
from proxy.refusals import RefusalFolder
from proxy.spool import Row, Spool

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECONDS = 0.2
BATCH_MAX_ROWS = 2000
# About 1 KB each: tens of MB at most, and hours of traffic for one model.
MAX_BUFFERED_ROWS = 50_000
PROBE_INTERVAL_SECONDS = 1.0  # while the database is down: how often to try it again
REPLAY_SECONDS_PER_FLUSH = 1.0  # then the new rows get their turn
# Rows per replayed chunk, and so per committed spool offset: a crash resends at most one.
REPLAY_CHUNK_ROWS = 500

InsertRows = Callable[[Sequence[Row]], Awaitable[None]]
Probe = Callable[[], Awaitable[object]]


class RequestLog:
    """Buffers rows and writes them in the background; see the module docstring."""

    def __init__(
        self,
        insert_rows: InsertRows,
        spool: Spool,
        probe: Probe | None = None,
        on_dropped: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.insert_rows = insert_rows
        self.spool = spool
        self.probe = probe  # None: the next insert itself is the probe
        self.on_dropped = on_dropped
        self.clock = clock
        self.buffer: list[Row] = []
        self.folder = RefusalFolder(clock)
        self.wakeup = asyncio.Event()
        self.is_database_down = False
        self.next_probe_at = 0.0
        self.written = 0
        self.dropped = 0  # rows lost: over the spool's cap, or neither disk nor memory took them
        self.reported_dropped = 0
        self.last_refusal = ""

    @property
    def problem(self) -> str | None:
        """Why rows cannot be saved right now, for /readyz; None when all is well."""
        error = self.spool.error
        if error and self.dropped:
            error += f"; {self.dropped} rows dropped"
        return error

    def add(self, row: Row) -> None:
        """Queue one row; never blocks, never fails."""
        if self.folder.absorbs(row):
            return  # a repeated anonymous refusal: counted in one row, written later
        self.buffer.append(row)
        if len(self.buffer) >= BATCH_MAX_ROWS:
            self.wakeup.set()
        self._cap_buffer()

    async def run(self) -> None:
        """Flush forever, every FLUSH_INTERVAL_SECONDS or when the buffer fills."""
        await flush_forever(self.flush, self.wakeup, FLUSH_INTERVAL_SECONDS, "request log")

    async def flush(self) -> None:
        """Replay the spool if there is one, then write the buffer; spool it on failure."""
        self.buffer.extend(self.folder.due())
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

    async def close(self) -> None:
        """Write everything still buffered: to the database, else to the spool."""
        self.buffer.extend(self.folder.due(is_closing=True))
        await self.flush()
        if self.buffer:  # behind an unfinished replay, or the database is down
            rows, self.buffer = self.buffer, []
            await self._spool(rows)
        if self.buffer:
            log.error("request log: %d rows could not be saved at shutdown", len(self.buffer))
        self._report_dropped()
        self.spool.close()

    async def _write(self, rows: list[Row]) -> bool:
        """Write rows (after the spool); False if some had to be kept for later."""
        if not await self._is_worth_trying():
            await self._keep(rows)
            return False
        if await self._spool_has_rows() and not await self._replay_spool():
            await self._keep(rows)
            return False
        for start in range(0, len(rows), BATCH_MAX_ROWS):
            batch = rows[start : start + BATCH_MAX_ROWS]
            if not await self._insert(batch):
                await self._keep(rows[start:])
                return False
        return True

    async def _is_worth_trying(self) -> bool:
        """Up, or down but answering the probe that is due; else rows only go to the spool."""
        if not self.is_database_down:
            return True
        now = self.clock()
        if now < self.next_probe_at:
            return False
        self.next_probe_at = now + PROBE_INTERVAL_SECONDS
        if self.probe is None:
            return True
        try:
            await self.probe()
        except Exception as error:  # whatever the reason, it cannot take rows now
            log.debug("request log: the database probe failed: %r", error)
            return False
        return True

    async def _insert(self, batch: Sequence[Row]) -> bool:
        """Insert one batch; False if it must be kept for later."""
        try:
            await self.insert_rows(batch)
        except Exception as error:
            failure = classify(error)
            if failure is Failure.DATA:
                # Refused for ever: set aside for the operator, so that they do not
                # block every later row behind them.
                await self._set_aside(batch, error)
                return True
            if failure is Failure.OTHER and str(error) != self.last_refusal:
                # A schema or permission problem: the rows are fine, keep them.
                log.error("request log: the database refuses rows (%s); keeping them", error)
                self.last_refusal = str(error)
            self._note_database(is_down=True, error=error)
            return False
        self.last_refusal = ""
        self._note_database(is_down=False)
        self.written += len(batch)
        return True

    async def _set_aside(self, batch: Sequence[Row], error: BaseException) -> None:
        try:
            path = await self.spool.set_aside(batch)
        except OSError as write_error:
            log.error(
                "request log: %d rows refused (%s) and lost: %s", len(batch), error, write_error
            )
            self._count_dropped(len(batch))
            return
        log.error("request log: %d rows refused (%s); kept in %s", len(batch), error, path)

    async def _spool_has_rows(self) -> bool:
        try:
            return await self.spool.has_rows()
        except OSError:
            return True  # let the replay try, and report what it finds

    async def _replay_spool(self) -> bool:
        """Replay chunks, oldest first: True once the spool is empty; False if the
        database fails or this flush's share of time is spent (the next one resumes)."""
        deadline = self.clock() + REPLAY_SECONDS_PER_FLUSH
        try:
            while True:
                chunk = await self.spool.read_chunk(REPLAY_CHUNK_ROWS)
                if chunk.rows and not await self._insert(chunk.rows):
                    return False
                if await self.spool.commit(chunk.end):
                    log.warning(
                        "request log: replayed the spool %s into the database", self.spool.path
                    )
                    return True
                if self.clock() > deadline:
                    return False
        except OSError as error:
            message = f"cannot read the spool file {self.spool.path}: {error.strerror}"
            if message != self.spool.error:
                log.error("request log: %s; new rows wait behind it", message)
            self.spool.error = message
            return False

    async def _keep(self, rows: list[Row]) -> None:
        # While the database is down, on disk if possible. Otherwise (the database is
        # up but the spool is not yet replayed) in memory, behind the spool.
        if not rows:
            return
        if self.is_database_down:
            await self._spool(rows)
        else:
            self._hold(rows)

    async def _spool(self, rows: list[Row]) -> None:
        refused = await self.spool.append(rows)
        if refused is None:  # the disk refused: hold them in memory, to try again
            self._hold(rows)
        elif refused:
            self._count_dropped(refused)

    def _hold(self, rows: list[Row]) -> None:
        self.buffer[:0] = rows
        self._cap_buffer()

    def _cap_buffer(self) -> None:
        excess = len(self.buffer) - MAX_BUFFERED_ROWS
        if excess > 0:
            del self.buffer[:excess]  # the oldest go; the newest are the likeliest asked about
            self._count_dropped(excess)

    def _count_dropped(self, count: int) -> None:
        self.dropped += count
        if self.on_dropped is not None:
            self.on_dropped(count)

    def _report_dropped(self) -> None:
        # Once per flush, not once per request: a long outage must not flood the log.
        if self.dropped > self.reported_dropped:
            log.error(
                "request log: dropped %d rows (%d in all): the database is unavailable and "
                "the spool (at most %d MiB) and memory (at most %d rows) are full or unusable",
                self.dropped - self.reported_dropped,
                self.dropped,
                self.spool.max_bytes // 2**20,
                MAX_BUFFERED_ROWS,
            )
            self.reported_dropped = self.dropped

    def _note_database(self, is_down: bool, error: BaseException | None = None) -> None:
        if is_down and not self.is_database_down:
            self.next_probe_at = self.clock() + PROBE_INTERVAL_SECONDS
            log.warning(
                "request log: database unavailable (%s); spooling rows to %s",
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
    repeat_count: int = 1  # more for folded anonymous refusals (proxy/refusals.py)

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
