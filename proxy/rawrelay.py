"""Relaying a streamed answer below aiohttp's StreamReader: each read goes out in the
callback that received it.

The backend's socket feeds RawAnswer (proxy/rawupstream.py), which takes off the chunked
framing and calls StreamRelay.take with each read's payload. take() counts it
(proxy/usage.py) and, while the client keeps up, frames it and hands it to the client's
socket at once (ClientWriter.try_write): no task wakes up, no coroutine runs, per event.

Whatever may have to wait goes to the request's task instead, with the backend's reading
paused meanwhile, so nothing piles up in the gateway:
- a chunk the client's socket buffer has no room for (past its low-water mark), or any
  chunk before the first (which sends the headers through aiohttp): written with the
  client write deadline (proxy/deadlines.py), then reading resumes;
- `data: [DONE]`: the part before it goes out, `before_done()` runs while the request
  still holds its backend slot (the prompt count, perhaps a usage event), then [DONE];
- the end of the body, its breaking off (UpstreamBroke), or the backend's silence for
  LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS (TimeoutError), which `run` raises.
When `run` ends, for any reason, the backend's connection is dropped, so a backend still
generating stops.
"""

from __future__ import annotations

import asyncio

from proxy.rawupstream import RawAnswer
from proxy.relay import BeforeDone, ClientWriter, split_done_prefix
from proxy.requestlog import RequestRecord
from proxy.usage import UsageCounter


class StreamRelay:
    """One streamed answer from a RawAnswer to the client, until [DONE] or its end."""

    def __init__(
        self,
        answer: RawAnswer,
        client: ClientWriter,
        record: RequestRecord,
        counter: UsageCounter,
        before_done: BeforeDone,
        silence_seconds: float | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.answer = answer
        self.client = client
        self.record = record
        self.counter = counter
        self.before_done = before_done
        self.silence_seconds = silence_seconds
        self.pending: list[bytes] = []  # chunks for the task to write, reading paused
        self.held = b""  # a read's tail that may be the start of [DONE]
        self.done_chunk: bytes | None = None
        self.is_ended = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.is_reading = False
        self.waiting_since = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None

    # --- called by RawAnswer, in its data_received / connection_lost --------------------

    def take(self, payload: bytes) -> None:
        """One read's payload: out to the client now if it has room, else to the task."""
        if self.done_chunk is not None or self.is_ended:
            return  # after [DONE] nothing more is relayed
        self.waiting_since = self.loop.time()
        if self.held:
            payload, self.held = self.held + payload, b""
        chunk, self.held = split_done_prefix(payload)
        if not chunk:
            return
        self.counter.feed_stream(chunk)
        self.record.response_bytes += len(chunk)
        if self.counter.saw_done:
            self.done_chunk = chunk
        elif not self.pending and self.client.try_write(chunk):
            return
        else:
            self.pending.append(chunk)
        self._hand_over()

    def end(self, error: BaseException | None) -> None:
        """The body ended (error None) or failed."""
        if self.is_ended:
            return
        self.is_ended, self.error = True, error
        self._hand_over()

    # --- the request's task ----------------------------------------------------------------

    async def run(self) -> None:
        """Relay until [DONE] or the body's end; raises what ended the body badly."""
        self.answer.relay_to(self)
        if self.silence_seconds is not None:
            self.timer = self.loop.call_at(
                self.waiting_since + self.silence_seconds, self._check_silence
            )
        try:
            while True:
                while self.pending:
                    await self.client.write(self.pending.pop(0))
                if self.done_chunk is not None:
                    await self._finish(self.done_chunk)
                    return
                if self.is_ended:
                    if self.error is not None:
                        raise self.error
                    if self.held:
                        self.record.response_bytes += len(self.held)
                        await self.client.write(self.held)
                    return
                await self._read_on()
        finally:
            self.is_ended = True  # no callback writes to the client from here on
            if self.timer is not None:
                self.timer.cancel()
            self.answer.close()

    async def _read_on(self) -> None:
        """Let the backend's reads flow (take() relays them) until the task has work."""
        self.waiter = self.loop.create_future()
        self.is_reading = True
        self.waiting_since = self.loop.time()
        self.answer.resume()
        try:
            await self.waiter
        finally:
            self.waiter = None

    async def _finish(self, chunk: bytes) -> None:
        # The answer is complete. Waiting for the backend's end of stream first would
        # race the client's hang-up and log a finished answer as cut short.
        start = max(self.counter.done_offset, 0)
        if start:
            await self.client.write(chunk[:start])
        extra = await self.before_done()
        self.record.response_bytes += len(extra)
        await self.client.write(extra + chunk[start:])

    def _hand_over(self) -> None:
        """Pause the backend and wake the task: what comes next may have to wait."""
        self.answer.pause()
        self.is_reading = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _check_silence(self) -> None:
        # One timer per silence period, not one per read: a read only notes its time.
        assert self.silence_seconds is not None
        now = self.loop.time()
        due = self.waiting_since if self.is_reading else now
        due += self.silence_seconds
        if now >= due:
            self.timer = None
            self.end(TimeoutError(f"the backend sent nothing for {self.silence_seconds:g} s"))
        else:
            self.timer = self.loop.call_at(due, self._check_silence)
