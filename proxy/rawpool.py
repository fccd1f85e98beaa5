"""Whole (non-stream) answers over pooled keep-alive connections, below aiohttp's client.

aiohttp's client cost the gateway more CPU per forwarded JSON request than anything
else. Here a request goes out as bytes on a kept-alive connection to its backend and
its answer is parsed by a RawAnswer (proxy/rawupstream.py), a fresh one per answer, fed
by the connection's protocol.

The rules that keep a reused connection safe:
- one idle list per backend URL, last in first out, at most MAX_IDLE_PER_BACKEND long;
- a connection goes back only when its answer was read whole, the answer did not say
  `Connection: close`, and nothing went wrong (cancelled, timed out, broke off, the
  client gone): otherwise it is closed, so a backend still generating stops;
- idle ones are dropped after IDLE_SECONDS, below uvicorn's 5 s keep-alive, so the
  backend seldom closes one first; one it closes (or that sends anything) while idle is
  dropped at once and never handed out;
- a reused connection that fails before its answer's first byte raises UpstreamStale
  (the backend may have closed it just as it was sent): proxy/dispatch.py then retries
  once on a fresh connection.
"""

from __future__ import annotations

import asyncio
from typing import cast

from proxy.rawupstream import (
    RawAnswer,
    UpstreamNoAnswer,
    backend_address,
    connect,
    request_bytes,
)

MAX_IDLE_PER_BACKEND = 64
# Below uvicorn's 5 s keep-alive, as aiohttp's connector had it (keepalive_timeout=4).
IDLE_SECONDS = 4.0


class UpstreamStale(UpstreamNoAnswer):
    """A reused connection closed before its answer's first byte: worth one retry."""


class PooledAnswer(RawAnswer):
    """One answer on a pooled connection; closing it hands the connection back or drops it."""

    def __init__(self, connection: PooledConnection, is_reused: bool) -> None:
        super().__init__()
        self.connection: PooledConnection | None = connection
        self.is_reused = is_reused

    def data_received(self, data: bytes) -> None:
        if self.is_ended:
            self.is_whole = False  # bytes after the answer: the connection is out of step
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.is_reused and not self.head.done() and not self.received:
            self.head.set_exception(
                UpstreamStale("the backend had closed the kept-alive connection")
            )
            return
        super().connection_lost(exc)

    def close(self) -> None:
        """Back to the pool if the answer was read whole and may be followed; else dropped."""
        self.is_ended = True
        connection, self.connection, self.transport = self.connection, None, None
        if connection is None:
            return  # closed already (a relay closes, then the forwarder's `async with`)
        is_reusable = self.is_whole and "close" not in self.headers.get("Connection", "").lower()
        connection.finish(is_reusable)


class PooledConnection(asyncio.Protocol):
    """One kept-alive connection: feeds its current answer, or watches for a close while idle."""

    def __init__(self, pool: KeepAlivePool, url: str) -> None:
        self.pool = pool
        self.url = url
        self.transport: asyncio.Transport | None = None
        self.answer: PooledAnswer | None = None
        self.is_lost = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.answer is not None:
            self.answer.data_received(data)
        else:
            self.abort()  # nothing may arrive between answers

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_lost = True
        if self.answer is not None:
            self.answer.connection_lost(exc)
        else:
            self.pool.forget(self)

    def start_answer(self, is_reused: bool) -> PooledAnswer:
        assert self.transport is not None
        self.answer = PooledAnswer(self, is_reused)
        self.answer.connection_made(self.transport)
        return self.answer

    def finish(self, is_reusable: bool) -> None:
        """The answer is done with: keep the connection for the next, or close it."""
        self.answer = None
        if is_reusable and not self.is_lost and self.pool.keep(self):
            assert self.transport is not None
            self.transport.resume_reading()  # to notice the backend closing it while idle
        else:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class KeepAlivePool:
    """Idle kept-alive connections, per backend URL, and the requests sent over them."""

    def __init__(
        self, max_idle: int = MAX_IDLE_PER_BACKEND, idle_seconds: float = IDLE_SECONDS
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self.idle: dict[str, list[PooledConnection]] = {}  # oldest first
        self.sweeper: asyncio.TimerHandle | None = None
        self.is_closed = False

    async def send(
        self,
        url: str,
        method: str,
        route: str,
        body: bytes,
        headers: dict[str, str],
        connect_seconds: float | None,
        answer_seconds: float | None,
        is_fresh: bool = False,
    ) -> PooledAnswer:
        """Send the request to the backend at `url`; its answer once the head has arrived.

        Raises UpstreamUnreachable, UpstreamNoAnswer (UpstreamStale on a reused
        connection), or TimeoutError when the head takes longer than `answer_seconds`.
        """
        address = backend_address(url)
        connection = None if is_fresh else self._take_idle(url)
        is_reused = connection is not None
        if connection is None:
            connection = await self._connect(url, connect_seconds)
        answer = connection.start_answer(is_reused)
        try:
            assert connection.transport is not None
            connection.transport.write(
                request_bytes(
                    method,
                    address.netloc,
                    address.path + route,
                    body,
                    headers,
                    is_keep_alive=True,
                )  # fmt: skip
            )
            async with asyncio.timeout(answer_seconds):
                await answer.head
        except BaseException:
            answer.is_whole = False
            answer.close()
            raise
        return answer

    def keep(self, connection: PooledConnection) -> bool:
        """Put an idle connection on its backend's list; False when full (or closed)."""
        idle = self.idle.setdefault(connection.url, [])
        if self.is_closed or len(idle) >= self.max_idle:
            return False
        connection.idle_since = self.loop.time()
        idle.append(connection)
        if self.sweeper is None:
            self.sweeper = self.loop.call_at(connection.idle_since + self.idle_seconds, self._sweep)
        return True

    def forget(self, connection: PooledConnection) -> None:
        """Take a connection that closed while idle off its list."""
        idle = self.idle.get(connection.url, [])
        if connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        """Close every idle connection; later answers close theirs rather than keep them."""
        self.is_closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        for idle in self.idle.values():
            while idle:
                idle.pop().abort()

    def idle_count(self, url: str) -> int:
        return len(self.idle.get(url, ()))

    # --- inside ------------------------------------------------------------------------

    def _take_idle(self, url: str) -> PooledConnection | None:
        idle = self.idle.get(url)
        if not idle:
            return None
        connection = idle.pop()  # the newest: the least likely to be closed by now
        # Lost, or aborted with its connection_lost still to come (it sent bytes while idle).
        transport = connection.transport
        if connection.is_lost or transport is None or transport.is_closing():
            return self._take_idle(url)
        if self.loop.time() - connection.idle_since >= self.idle_seconds:
            idle.append(connection)
            self._sweep()  # it and every older one are past their time
            return None
        return connection

    def _sweep(self) -> None:
        """Drop the connections idle for too long; come back when the next one will be."""
        self.sweeper = None
        now, next_due = self.loop.time(), None
        for idle in self.idle.values():
            while idle and now - idle[0].idle_since >= self.idle_seconds:
                idle.pop(0).abort()
            if idle:
                due = idle[0].idle_since + self.idle_seconds
                next_due = due if next_due is None else min(next_due, due)
        if next_due is not None:
            self.sweeper = self.loop.call_at(next_due, self._sweep)

    async def _connect(self, url: str, connect_seconds: float | None) -> PooledConnection:
        return await connect(
            backend_address(url), lambda: PooledConnection(self, url), connect_seconds
        )
