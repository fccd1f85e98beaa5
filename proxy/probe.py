"""Health probes of every backend, each second, which take backends out of the pool and back.

The probe is GET /openapi.json: llama_cpp.server answers it without its global lock, so
it answers at once even while it generates. /v1/models would wait for that lock (and with
interrupt_requests it would cut a running stream short), so it is never probed.

Any HTTP answer means the backend is alive. No answer within the probe timeout (a hung
process whose port still accepts connections) or a refused connection takes it out of the
pool, and the requests still waiting for its first byte go to another backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from proxy.pool import Backend, BackendPool

log = logging.getLogger(__name__)

PROBE_ROUTE = "/openapi.json"
PROBE_INTERVAL_SECONDS = 1.0


class BackendProber:
    """Probes the pool's backends in the background; start() after the session exists."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pool: BackendPool,
        timeout: float,
        interval: float = PROBE_INTERVAL_SECONDS,
    ) -> None:
        self.session = session
        self.pool = pool
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Probe every backend once, so the pool starts out true, then keep probing."""
        await self.probe_all()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def probe_all(self) -> None:
        await asyncio.gather(*(self.probe(backend) for backend in self.pool.backends))

    async def probe(self, backend: Backend) -> None:
        """Ask one backend; mark it up if it answers, else down."""
        try:
            async with self.session.get(backend.url + PROBE_ROUTE, timeout=self.timeout) as answer:
                await answer.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            self.pool.mark_down(backend, f"{type(error).__name__} from its health probe")
            self.pool.abandon_first_byte_waits(backend)
            return
        self.pool.mark_up(backend)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.probe_all()
            except Exception:  # a bug here must not end probing, and with it every rejoin
                log.exception("probing the backends failed; trying again")
