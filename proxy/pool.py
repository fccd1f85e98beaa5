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

Besides the local replicas (LLAMA_PROXY_BACKEND_URL), the pool holds the shared members
of llama_backends (proxy/registry.py), whose slots every gateway on the database shares.
A turn takes a local free slot first, with no database round trip; only when none is
free does it lease a shared slot (proxy/sharedslots.py), or wait for one. A drained,
refused or removed member takes nothing new; the requests it runs finish.

A shared slot whose request has ended stays this gateway's, idle, while nothing waits for
it here or elsewhere (proxy/sharedslots.py): the next turn that finds no local slot takes
such a kept slot first, of the least recently used member, with no round trip.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from proxy.registry import Member
    from proxy.sharedslots import SharedSlots

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # a turn waiting for a shared slot looks again this often

WAIT: Literal["wait"] = "wait"  # pick(): every untried backend that is up is busy


class SlotWaitTimeout(Exception):
    """A turn waited longer than the queue timeout for a slot (shared ones all held)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"every backend slot stayed busy for {seconds:.0f}s")
        self.seconds = seconds


@dataclass(eq=False)
class Backend:
    """One llama_cpp.server: its state in the pool and its figures for /metrics."""

    index: int
    url: str
    slots: int
    authorization: str = ""  # "Bearer <its key>": a shared member has a key of its own
    name: str = ""  # a shared member's name (labels, logs); local replicas go by address
    member_id: int | None = None  # a shared member's id in llama_backends
    is_draining: bool = False  # a shared member that takes nothing new: drained, refused, gone
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
    def label(self) -> str:
        """How /metrics, /readyz and the log name it: a shared member by its name."""
        return self.name or self.address

    @property
    def has_free_slot(self) -> bool:
        return self.busy < self.slots


@dataclass(slots=True)
class Lease:
    """One request's slot on one backend."""

    backend: Backend
    started: float
    slot: int = -1  # the shared slot's number; -1 on a local replica


def _last_used(backend: Backend) -> int:
    return backend.last_used


class BackendPool:
    """The backends behind this gateway, each with `slots` requests at a time."""

    def __init__(
        self,
        urls: Sequence[str],
        slots: int,
        clock: Callable[[], float] = time.monotonic,
        key: str = "",
        wait_seconds: float = 30.0,
    ) -> None:
        bearer = f"Bearer {key}"
        self.local = tuple(Backend(index, url, slots, bearer) for index, url in enumerate(urls))
        self.backends = self.local  # local replicas, then shared members
        self.members: dict[int, Backend] = {}  # shared members by id
        self.shared: SharedSlots | None = None  # set by share_through()
        self.wait_seconds = wait_seconds  # the longest a turn waits for a shared slot
        self.on_capacity: Callable[[int], None] = lambda capacity: None
        self._indexes = itertools.count(len(urls))
        self._clock = clock
        self._turns = itertools.count()
        self._waiters: list[asyncio.Future[None]] = []
        self._wakeups = 0  # how often waiters were woken: one woken while none waited

    @property
    def capacity(self) -> int:
        """Requests all backends can take at once: the fair queue admits this many.

        Shared members count whole, though other gateways may hold some of their slots:
        a turn then waits here for one.
        """
        return sum(backend.slots for backend in self.backends if not backend.is_draining)

    def serving(self) -> int:
        """How many backends are up (and take requests)."""
        return sum(backend.is_up and not backend.is_draining for backend in self.backends)

    def share_through(self, shared: SharedSlots) -> None:
        """Lease shared members' slots through `shared`; its wake-ups reach the waiters."""
        self.shared = shared
        shared.on_free = self._wake_waiters

    def update_members(self, members: Sequence[Member]) -> None:
        """Take the registry's new list of shared members; in-flight requests are untouched."""
        current: dict[int, Backend] = {}
        for member in members:
            backend = self.members.get(member.member_id)
            if backend is None:
                backend = Backend(next(self._indexes), member.url, member.concurrency)
                backend.member_id = member.member_id
                log.info("shared backend %s (%s) joins the pool", member.name, member.url)
            backend.url, backend.slots, backend.name = member.url, member.concurrency, member.name
            backend.authorization = f"Bearer {member.key}"
            if backend.is_draining != (member.state != "active"):
                log.info("shared backend %s is %s", member.name, member.state)
            backend.is_draining = member.state != "active"
            if backend.is_draining:
                self._give_back_kept(backend)
            current[member.member_id] = backend
        for member_id, gone in self.members.items():
            if member_id not in current:
                gone.is_draining = True  # its in-flight requests still hold it
                self._give_back_kept(gone)
                log.info("shared backend %s left the pool", gone.label)
        self.members = current
        self.backends = self.local + tuple(current.values())
        self.on_capacity(self.capacity)
        self._wake_waiters()

    def pick(self, tried: Collection[int]) -> Backend | None | Literal["wait"]:
        """The backend for a request that has tried `tried`; WAIT for a slot; None: none left."""
        # One pass, no lists: this runs for every request.
        free_up: Backend | None = None
        free_down: Backend | None = None
        has_busy_up = has_busy_down = False
        for backend in self.local:
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
        """A slot on the backend pick() names, waiting for one if need be; None: none left.

        With shared members, a turn that finds no local slot leases a shared one; it
        may wait up to wait_seconds for one (then SlotWaitTimeout).
        """
        choice = self.pick(tried)
        if choice is None or choice == WAIT:
            if self.members:
                return await self._acquire_shared(tried)
            while (choice := self.pick(tried)) == WAIT:
                await self._wait()
            if choice is None:
                return None
        return self._lease(choice)

    def _lease(self, choice: Backend, slot: int = -1) -> Lease:
        choice.busy += 1
        choice.requests += 1
        choice.last_used = next(self._turns)
        return Lease(choice, self._clock(), slot)

    async def _acquire_shared(self, tried: Collection[int]) -> Lease | None:
        assert self.shared is not None
        deadline = self._clock() + self.wait_seconds
        is_waiting = has_slot = False
        try:
            while True:
                wakeups = self._wakeups
                local = self.pick(tried)
                if isinstance(local, Backend):
                    return self._lease(local)
                candidates = [
                    backend.member_id
                    for backend in sorted(self.members.values(), key=_last_used)
                    if backend.index not in tried and backend.is_up and not backend.is_draining
                ]
                if candidates:
                    taken = self.shared.take_kept(candidates) or await self.shared.take(
                        candidates, is_waiting
                    )
                    if taken is not None:
                        lease = self._lease_shared(*taken)
                        if lease is not None:
                            has_slot = True
                            return lease
                elif local is None and not self._may_have_shared(tried):
                    return None
                if self._clock() >= deadline:
                    raise SlotWaitTimeout(self.wait_seconds)
                if not is_waiting:
                    is_waiting = True
                    self.shared.start_waiting()
                # A slot given back while the take ran (the notification came before this
                # turn waited) wakes no one: look again at once instead of at the next poll.
                if self._wakeups == wakeups:
                    await self._wait(POLL_SECONDS)
        finally:
            if is_waiting:
                self.shared.stop_waiting(has_slot)

    def _lease_shared(self, member_id: int, slot: int) -> Lease | None:
        """The lease on a slot just taken; None (and the slot given back) if the member
        was drained or removed meanwhile."""
        assert self.shared is not None
        backend = self.members.get(member_id)
        if backend is None or backend.is_draining:
            self.shared.give_back(member_id, slot, 0, 0)
            return None
        return self._lease(backend, slot)

    def _give_back_kept(self, backend: Backend) -> None:
        if self.shared is not None and backend.member_id is not None:
            self.shared.give_back_kept(backend.member_id)

    def _may_have_shared(self, tried: Collection[int]) -> bool:
        # A member that is down or drained may come back; one tried already may not.
        return any(backend.index not in tried for backend in self.members.values())

    async def _wait(self, timeout: float | None = None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self, lease: Lease, is_failed: bool) -> None:
        """Give the slot back; a failed request counts as the backend's error."""
        backend = lease.backend
        backend.busy -= 1
        backend.seconds_busy += self._clock() - lease.started
        if is_failed:
            backend.errors += 1
        if lease.slot >= 0 and self.shared is not None and backend.member_id is not None:
            if self.shared.may_keep and backend.is_up and not backend.is_draining and not is_failed:
                self.shared.keep(backend.member_id, lease.slot, 1, 0)
            else:
                self.shared.give_back(backend.member_id, lease.slot, 1, int(is_failed))
        self._wake_waiters()

    def mark_down(self, backend: Backend, problem: str) -> None:
        """Take a backend out of the pool until a probe finds it answering."""
        backend.problem = problem
        self._give_back_kept(backend)
        if backend.is_up:
            backend.is_up = False
            log.warning("backend %s is down: %s", backend.label, problem)
            self._wake_waiters()

    def mark_up(self, backend: Backend) -> None:
        """Put a backend back in the pool: it answered."""
        if not backend.is_up:
            backend.is_up = True
            log.info("backend %s is back in the pool", backend.label)
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
        self._wakeups += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
