"""Sending a request to a backend of the pool: which one, failing over, waiting out a restart.

The pool (proxy/pool.py) names the backend. One that refuses the connection or fails
before its first byte is marked down and the request goes to the next, with no error to
the client. Only when every backend has failed does the client get 502 (504 if the last
one was silent), or, while the console restarts the backends, does the request wait for
one, up to LLAMA_PROXY_BACKEND_WAIT_SECONDS (then 503).

A streamed request (`"stream": true`) goes over a connection of its own
(proxy/rawupstream.py), so that its answer can be relayed below aiohttp; any other
request goes over a pooled keep-alive connection (proxy/rawpool.py). A reused one that
fails before its first byte may just have been closed by the backend: the request is
sent once more, on a new connection, before the backend counts as failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from proxy.config import DEFAULT_RESTART_FLAG_MAX_AGE_SECONDS
from proxy.errors import GatewayError, bad_gateway, unavailable
from proxy.modelcheck import ModelCheck
from proxy.pool import Backend, BackendPool, Lease, SlotWaitTimeout
from proxy.rawpool import KeepAlivePool, UpstreamStale
from proxy.rawupstream import RawAnswer, UpstreamError, open_answer

log = logging.getLogger(__name__)

RETRY_INTERVAL_SECONDS = 0.1
NO_BACKEND = (
    "no backend in the pool: start one here (LLAMA_SERVER_REPLICAS) or add one with add-backend"
)


class BackendFailed(Exception):
    """A backend failed before its first byte; the request may go to another."""

    def __init__(self, reason: str, is_timeout: bool = False, may_be_stale: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.is_timeout = is_timeout  # silent past LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS
        self.may_be_stale = may_be_stale  # a pooled connection it closed: worth one retry


class Dispatcher:
    """Finds each request a backend that answers, over pooled keep-alive connections.

    The session is the prober's and the prompt counter's; its timeouts are the requests'.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        pool: BackendPool,
        wait_seconds: float,
        restart_flag: Path | None,
        on_restart_wait: Callable[[], None] = lambda: None,
        restart_flag_max_age: float = DEFAULT_RESTART_FLAG_MAX_AGE_SECONDS,
        model_check: ModelCheck | None = None,
    ) -> None:
        self.session = session
        self.pool = pool
        self.wait_seconds = wait_seconds
        self.restart_flag = restart_flag
        self.on_restart_wait = on_restart_wait
        self.restart_flag_max_age = restart_flag_max_age
        self.model_check = model_check
        self._ignored_flag_mtime: float | None = None
        self.connections = KeepAlivePool()

    def close(self) -> None:
        """Close the idle kept-alive connections (at shutdown)."""
        self.connections.close()

    def is_restarting(self) -> bool:
        """True while the console restarts the backend (it keeps a flag file meanwhile).

        A flag older than any restart takes was left by a console killed mid-restart;
        honouring it would turn every 502 into a wait and a 503, so it is ignored.
        """
        if self.restart_flag is None:
            return False
        try:
            mtime = self.restart_flag.stat().st_mtime
        except OSError:
            return False
        age = time.time() - mtime
        if age <= self.restart_flag_max_age:
            return True
        if self._ignored_flag_mtime != mtime:
            self._ignored_flag_mtime = mtime
            log.warning(
                "ignoring the restart flag %s: it is %.0fs old, longer than a restart takes "
                "(%.0fs), so a console was probably killed mid-restart; the next start or "
                "restart removes it",
                self.restart_flag,
                age,
                self.restart_flag_max_age,
            )
        return False

    async def send(
        self,
        method: str,
        route: str,
        body: bytes,
        headers: dict[str, str],
        is_stream: bool = False,
    ) -> tuple[Lease, RawAnswer]:
        """A backend's response, trying each backend once; waits out a restart, else 502/503."""
        if not self.pool.backends:
            raise unavailable(NO_BACKEND, retry_after=self.wait_seconds, code="no_backend")
        deadline = time.monotonic() + self.wait_seconds
        has_waited = False
        while True:
            tried: set[int] = set()
            failure: BackendFailed | None = None
            try:
                while (lease := await self.pool.acquire(tried)) is not None:
                    tried.add(lease.backend.index)
                    try:
                        response = await self._attempt(
                            lease.backend, method, route, body, headers, is_stream
                        )
                    except BackendFailed as failed:
                        failure = failed
                        self.pool.release(lease, is_failed=True)
                        self.pool.mark_down(lease.backend, failed.reason)
                    except BaseException:
                        self.pool.release(lease, is_failed=False)
                        raise
                    else:
                        # It answered: a down one (a last resort) is back, before its probe says so.
                        self.pool.mark_up(lease.backend)
                        return lease, response
            except SlotWaitTimeout as timeout:
                raise self._busy_error(timeout) from None
            if (failure is not None and failure.is_timeout) or not self.is_restarting():
                raise self._no_backend_error(failure, len(tried))
            if time.monotonic() >= deadline:
                raise unavailable(
                    "the model backend is restarting; try again shortly",
                    retry_after=self.wait_seconds,
                    code="backend_restarting",
                ) from None
            if not has_waited:
                has_waited = True
                self.on_restart_wait()
            await asyncio.sleep(RETRY_INTERVAL_SECONDS)

    async def _check_model(self, backend: Backend) -> None:
        """A shared member that now serves another model is refused (proxy/modelcheck.py)."""
        assert self.model_check is not None
        if self.model_check.is_due(backend):
            problem = await self.model_check.check(backend)
            if problem is not None:
                backend.is_draining = True  # here at once; the others hear the trigger
                raise BackendFailed(problem)

    def _busy_error(self, timeout: SlotWaitTimeout) -> GatewayError:
        return unavailable(
            f"{timeout}: the shared backends are in use by other gateways; try again",
            retry_after=self.wait_seconds,
            code="backend_busy",
        )

    async def _attempt(
        self,
        backend: Backend,
        method: str,
        route: str,
        body: bytes,
        headers: dict[str, str],
        is_stream: bool,
    ) -> RawAnswer:
        """The backend's response head; BackendFailed if it fails before its first byte."""
        if backend.member_id is not None and self.model_check is not None:
            await self._check_model(backend)
        try:
            return await self._request(backend, method, route, body, headers, is_stream)
        except BackendFailed as failed:
            if not failed.may_be_stale:
                raise
        # Perhaps a pooled connection the backend had just closed: once more, on a new one.
        return await self._request(backend, method, route, body, headers, is_stream, True)

    async def _request(
        self,
        backend: Backend,
        method: str,
        route: str,
        body: bytes,
        headers: dict[str, str],
        is_stream: bool,
        is_fresh: bool = False,
    ) -> RawAnswer:
        # A failed health probe cancels this task's wait (the backend hangs); the task is
        # cancelled the way asyncio.timeout does it, which costs 6 us more per request.
        task = asyncio.current_task()
        assert task is not None
        waits = backend.first_byte_waits
        waits[task] = False
        timeout = self.session.timeout
        headers["Authorization"] = backend.authorization  # each backend has its own key
        try:
            if is_stream:
                return await open_answer(
                    backend.url, method, route, body, headers,
                    timeout.sock_connect, timeout.sock_read,
                )  # fmt: skip
            return await self.connections.send(
                backend.url, method, route, body, headers,
                timeout.sock_connect, timeout.sock_read, is_fresh,
            )  # fmt: skip
        except asyncio.CancelledError:
            # Unless the client went too (or the request cap ran out), it was only the probe.
            if waits[task] and task.uncancel() == 0:
                raise BackendFailed("no answer, and it failed its health probe") from None
            raise
        except TimeoutError as error:
            raise BackendFailed(type(error).__name__, is_timeout=True) from None
        except UpstreamStale as error:
            raise BackendFailed(str(error), may_be_stale=True) from None
        except UpstreamError as error:
            # Refused, or no answer on a new connection: no retry on this backend.
            raise BackendFailed(str(error)) from None
        finally:
            del waits[task]

    def _no_backend_error(self, failure: BackendFailed | None, tried: int) -> GatewayError:
        if failure is not None and failure.is_timeout:
            return GatewayError(
                504, "the model backend did not answer in time", "server_error", "timeout"
            )
        reason = failure.reason if failure is not None else "every backend is busy or down"
        which = "the model backend is" if tried <= 1 else f"none of the {tried} model backends is"
        return bad_gateway(
            f"{which} not reachable ({reason}); the operator can check it with ./console.sh status"
        )
