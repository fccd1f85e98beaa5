"""Which backend serves a granted turn: the pool of llama_cpp.server processes.

The fair queue decides whose turn it is; the pool only decides where it runs. A turn goes
to a backend that is up and has a free slot, the least recently used one, so that load
spreads evenly across replicas. The queue admits as many requests as the backends have
slots in all, so with every backend up a granted turn always finds one free.

A backend is marked down when a request to it fails before its first byte or its health
probe fails (proxy/probe.py), and rejoins as soon as a probe answers. While some are down,
a granted turn may have to wait here for a slot on one that is up. A request tries each
backend at most once: the up ones first, then, as a last resort, the down ones, because
a probe may not yet have seen a backend that has just come back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

WAIT: Literal["wait"] = "wait"  # pick(): every untried backend that is up is busy


@dataclass(eq=False)
class Backend:
    """One llama_cpp.server: its state in the pool and its figures for /metrics."""

    index: int
    url: str
    slots: int
    is_up: bool = True
    problem: str = ""  # why it is down, for /readyz and the log
    busy: int = 0
    requests: int = 0  # attempts sent to it
    errors: int = 0  # attempts that failed, before their first byte or mid-answer
    seconds_busy: float = 0.0  # slot-seconds held by requests
    last_used: int = -1  # the number of its latest turn; never used sorts first
    # The tasks of requests waiting for its first byte, and whether a failed probe has
    # cancelled the wait (the backend hangs) so that they go to another backend.
    first_byte_waits: dict[asyncio.Task[Any], bool] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """host:port, for labels and messages."""
        return urlsplit(self.url).netloc

    @property
    def has_free_slot(self) -> bool:
        return self.busy < self.slots


@dataclass(slots=True)
class Lease:
    """One request's slot on one backend."""

    backend: Backend
    started: float


class BackendPool:
    """The backends behind this gateway, each with `slots` requests at a time."""

    def __init__(
        self, urls: Sequence[str], slots: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.backends = tuple(Backend(index, url, slots) for index, url in enumerate(urls))
        self._clock = clock
        self._turns = itertools.count()
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def capacity(self) -> int:
        """Requests all backends can take at once: the fair queue admits this many."""
        return sum(backend.slots for backend in self.backends)

    def serving(self) -> int:
        """How many backends are up."""
        return sum(backend.is_up for backend in self.backends)

    def pick(self, tried: Collection[int]) -> Backend | None | Literal["wait"]:
        """The backend for a request that has tried `tried`; WAIT for a slot; None: none left."""
        # One pass, no lists: this runs for every request.
        free_up: Backend | None = None
        free_down: Backend | None = None
        has_busy_up = has_busy_down = False
        for backend in self.backends:
            if backend.index in tried:
                continue
            if backend.busy >= backend.slots:
                if backend.is_up:
                    has_busy_up = True
                else:
                    has_busy_down = True
            elif backend.is_up:
                if free_up is None or backend.last_used < free_up.last_used:
                    free_up = backend
            elif free_down is None or backend.last_used < free_down.last_used:
                free_down = backend
        if free_up is not None:
            return free_up
        if has_busy_up:
            return WAIT
        # A down backend that is busy is no reason to give up: it may be serving (another
        # request's last resort found it back before its probe did), and its slot comes back
        # when that request ends, or at once if its probe finds it hung.
        return free_down or (WAIT if has_busy_down else None)

    async def acquire(self, tried: Collection[int] = ()) -> Lease | None:
        """A slot on the backend pick() names, waiting for one if need be; None: none left."""
        while (choice := self.pick(tried)) == WAIT:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if choice is None:
            return None
        choice.busy += 1
        choice.requests += 1
        choice.last_used = next(self._turns)
        return Lease(choice, self._clock())

    def release(self, lease: Lease, is_failed: bool) -> None:
        """Give the slot back; a failed request counts as the backend's error."""
        backend = lease.backend
        backend.busy -= 1
        backend.seconds_busy += self._clock() - lease.started
        if is_failed:
            backend.errors += 1
        self._wake_waiters()

    def mark_down(self, backend: Backend, problem: str) -> None:
        """Take a backend out of the pool until a probe finds it answering."""
        backend.problem = problem
        if backend.is_up:
            backend.is_up = False
            log.warning("backend %s is down: %s", backend.address, problem)
            self._wake_waiters()

    def mark_up(self, backend: Backend) -> None:
        """Put a backend back in the pool: it answered."""
        if not backend.is_up:
            backend.is_up = True
            log.info("backend %s is back in the pool", backend.address)
            self._wake_waiters()
        backend.problem = ""

    def abandon_first_byte_waits(self, backend: Backend) -> None:
        """Make every request still waiting for this backend's first byte give up on it."""
        waits = backend.first_byte_waits
        for task, is_abandoned in waits.items():
            if not is_abandoned:
                waits[task] = True
                task.cancel()

    def _wake_waiters(self) -> None:
        # Every waiter looks again; the first one woken takes the slot. Few ever wait:
        # only turns granted while some backend is down.
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
