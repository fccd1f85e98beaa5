"""This gateway's side of the shared slots: heartbeat, take, give back, wait, fairness.

The SQL lives in proxy/slotstore.py. Here: the gateway says it is alive every second; a
gateway whose heartbeat has failed for USABLE_FOR_SECONDS takes no shared slot (it cannot
know who holds what, and its own slots may already have expired), until a heartbeat goes
through again. A slot it could not give back while the database was away is given back by
the first heartbeat that goes through, since its lease may not have run out meanwhile.

Requests that wait for a shared slot are counted: the first marks the gateway as waiting
(its place in the cross-gateway line, see proxy/slotstore.py), the last one to leave
without a slot clears it. A slot given back anywhere wakes the waiters through a
notification on SLOTS_CHANNEL; a short poll (proxy/pool.py) covers one missed.

The leases commit without waiting for the disk (proxy/app.py), so a PostgreSQL crash can
lose the last ones. The heartbeat returns when the server started; when that changes,
the gateway reconciles (proxy/slotstore.py): the slots it holds get its id back, those in
its name it does not hold are freed. Meanwhile no gateway takes a slot (migration m012),
and this one takes none until its reconcile is through.

A slot whose request has ended is kept, idle, for this gateway's next turn when none of
its own requests waits and no other gateway does (as an HTTP client keeps a connection
alive): the next turn uses it with no round trip, and its figures are written in the
background. It stays this gateway's lease in the database, kept alive by the heartbeat and
counted as held by the reconcile. It is given back (the normal give-back) once idle for
KEEP_IDLE_SECONDS (checked at each heartbeat, so within 1-2 s), at once when another
gateway starts waiting (its notification 'wait:<id>' on SLOTS_CHANNEL, or a heartbeat
that finds a live gateway waiting), when its member is drained, refused, removed or down,
when the heartbeat fails, and at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from proxy import slotstore, store
from proxy.listener import Subscription
from proxy.migrations import SLOTS_CHANNEL

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0
USABLE_FOR_SECONDS = 3.0
# Rows of gateways gone this long are deleted, every so many heartbeats.
FORGET_GONE_AFTER_SECONDS = 3600.0
FORGET_EVERY_BEATS = 600
KEEP_IDLE_SECONDS = 1.0  # a kept slot idle this long goes back to the other gateways
WAIT_PREFIX = "wait:"  # SLOTS_CHANNEL payload of a gateway that starts waiting

GiveBack = tuple[int, int, int, int]  # backend id, slot, requests, errors


class SharedSlots:
    """Leases slots of shared members for this gateway; start() once the database is open."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        gateway_id: str = "",
        lease_seconds: float = slotstore.LEASE_SECONDS,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        usable_for: float = USABLE_FOR_SECONDS,
        keep_idle_seconds: float = KEEP_IDLE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.host = socket.gethostname()
        self.gateway_id = gateway_id or f"{self.host}-{uuid.uuid4().hex[:12]}"
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.usable_for = usable_for
        self.keep_idle_seconds = keep_idle_seconds
        self.clock = clock
        self.on_free: Callable[[], None] = lambda: None  # the pool wakes its waiters
        self.waiters = 0
        self._last_beat = float("-inf")
        self._has_warned = False
        self._unreturned: list[GiveBack] = []
        self._unrecorded: list[GiveBack] = []  # figures of kept slots not yet written
        self._tasks: set[asyncio.Task[Any]] = set()
        self._marking = asyncio.Lock()
        self._beating: asyncio.Task[None] | None = None
        self.held: set[tuple[int, int]] = set()  # (backend id, slot) taken, not given back
        self.kept: dict[tuple[int, int], float] = {}  # held, idle, for the next turn: since
        self.others_wait = False  # another live gateway waits for a slot: keep none
        self._db_started: datetime | None = None  # as the last heartbeat said
        self._must_reconcile = False
        self._is_reconciling = False
        self._takes_in_flight = 0
        self._no_take_in_flight = asyncio.Event()
        self._no_take_in_flight.set()

    @property
    def is_usable(self) -> bool:
        """Whether a heartbeat went through lately: only then may a slot be taken."""
        return self.clock() - self._last_beat < self.usable_for

    @property
    def may_keep(self) -> bool:
        """Whether a slot whose request ended may stay this gateway's for its next turn."""
        return (
            self.is_usable and not self.waiters and not self.others_wait
            and not self._is_reconciling
        )  # fmt: skip

    def subscription(self) -> Subscription:
        """Slots given back anywhere: the waiters look again at once."""
        return Subscription(
            channel=SLOTS_CHANNEL,
            on_notify=self._on_notify,
            on_listening=lambda: self.on_free(),
            on_lost=lambda: None,
        )

    def _on_notify(self, payload: str) -> None:
        if not payload.startswith(WAIT_PREFIX):
            self.on_free()
        elif payload != WAIT_PREFIX + self.gateway_id:
            self.others_wait = True  # until a heartbeat finds no live gateway waiting
            self.give_back_kept()

    async def start(self) -> None:
        await self.beat()
        self._beating = asyncio.create_task(self._beat_forever())

    async def stop(self) -> None:
        """Stop heartbeating; give back every slot and forget this gateway."""
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        try:
            self.kept.clear()
            await slotstore.give_back_all(self.pool, self.gateway_id)
        except store.UNAVAILABLE_ERRORS as error:
            log.warning(
                "could not give back the shared slots at shutdown (%s); they expire in %.0fs",
                type(error).__name__,
                self.lease_seconds,
            )

    async def beat(self) -> None:
        """One heartbeat; then give back what could not be given back before, and
        reconcile the slots after a restart of the database."""
        try:
            # The first one durably: the grace after a restart looks for this row.
            started = await slotstore.heartbeat(
                self.pool,
                self.gateway_id,
                self.host,
                self.waiters > 0,
                is_durable=self._db_started is None,
            )
        except store.UNAVAILABLE_ERRORS as error:
            if not self._has_warned and not self.is_usable:
                self._has_warned = True
                log.warning(
                    "shared backends unusable: the heartbeat of gateway %s fails (%s); "
                    "only this host's replicas serve until the database answers",
                    self.gateway_id,
                    type(error).__name__,
                )
            if not self.is_usable:
                self.give_back_kept()  # unusable: retried by the first heartbeat through
            return
        if self._has_warned:
            self._has_warned = False
            log.info("the database answers again: shared backends are back in use")
        self._last_beat = self.clock()
        if self._db_started is not None and started != self._db_started:
            self._must_reconcile = True
        self._db_started = started
        unreturned, self._unreturned = self._unreturned, []
        for backend_id, slot, requests, errors in unreturned:
            await self._give_back(backend_id, slot, requests, errors)
        unrecorded, self._unrecorded = self._unrecorded, []
        for backend_id, slot, requests, errors in unrecorded:
            await self._record_use(backend_id, slot, requests, errors)
        if self._must_reconcile:
            await self._reconcile()
        await self._give_back_idle()

    async def _give_back_idle(self) -> None:
        """Kept slots idle long enough go back; all of them if another gateway waits."""
        if self.kept or self.others_wait:
            with contextlib.suppress(*store.UNAVAILABLE_ERRORS):
                self.others_wait = await slotstore.others_wait(
                    self.pool, self.gateway_id, self.lease_seconds
                )
        self.give_back_kept(idle_for=0.0 if self.others_wait else self.keep_idle_seconds)

    async def _reconcile(self) -> None:
        """After a restart: the slot rows say again what this gateway holds."""
        self._is_reconciling = True  # no take meanwhile: its slot would not be in `held`
        try:
            await self._no_take_in_flight.wait()
            held = sorted(self.held)
            done = await slotstore.reconcile(self.pool, self.gateway_id, held, self.lease_seconds)
        except store.UNAVAILABLE_ERRORS:
            return  # the next heartbeat tries again
        finally:
            self._is_reconciling = False
        self._must_reconcile = False
        for backend_id, slot in set(held) - self.held:
            # Given back while the reconcile ran, which may have written it back after.
            self.give_back(backend_id, slot, 0, 0)
        # After that loop, or a kept slot would be given back twice (the second time,
        # maybe after this gateway took it again). Another gateway may have taken it.
        self.give_back_kept()
        log.warning(
            "the database restarted: gateway %s reconciled its shared slots "
            "(%d held, %d written back, %d not held freed)",
            self.gateway_id,
            len(self.held),
            done.restored,
            done.freed,
        )
        if done.taken_by_others:
            log.error(
                "shared slots %s (backend id/slot) that gateway %s still uses were taken "
                "by another gateway during the database restart; they may run two "
                "requests at once until this gateway's finish",
                ", ".join(done.taken_by_others),
                self.gateway_id,
            )
        self.on_free()

    async def _beat_forever(self) -> None:
        for count in itertools.count(1):
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                await self.beat()
                if count % FORGET_EVERY_BEATS == 0 and self.is_usable:
                    await slotstore.forget_gone_gateways(self.pool, FORGET_GONE_AFTER_SECONDS)
            except store.UNAVAILABLE_ERRORS:
                pass  # the next heartbeat says so
            except Exception:  # a bug here must not stop the heartbeat: slots would expire
                log.exception("the shared-slot heartbeat failed; trying again")

    async def take(self, backend_ids: Sequence[int], is_waiter: bool) -> tuple[int, int] | None:
        """A free slot of one of these members, now this gateway's; None if none may be had."""
        if not self.is_usable or self._is_reconciling:
            return None
        others_wait = self.waiters - is_waiter > 0
        taking = asyncio.ensure_future(
            slotstore.take_slot(
                self.pool, self.gateway_id, backend_ids, others_wait, self.lease_seconds
            )
        )
        self._takes_in_flight += 1
        self._no_take_in_flight.clear()
        taking.add_done_callback(self._took)
        try:
            return await asyncio.shield(taking)
        except store.UNAVAILABLE_ERRORS:
            return None
        except asyncio.CancelledError:
            # The request went (client gone, time cap) while its take was under way: a
            # slot the take still gets would stay this live gateway's for ever.
            taking.add_done_callback(self._give_back_orphan)
            raise

    def _took(self, taking: asyncio.Future[tuple[int, int] | None]) -> None:
        # Whether or not its request still waits for it (the orphan is given back next).
        if not taking.cancelled() and taking.exception() is None and taking.result():
            self.held.add(taking.result())
        self._takes_in_flight -= 1
        if not self._takes_in_flight:
            self._no_take_in_flight.set()

    def _give_back_orphan(self, taking: asyncio.Future[tuple[int, int] | None]) -> None:
        if not taking.cancelled() and taking.exception() is None:
            taken = taking.result()
            if taken is not None:
                self.give_back(*taken, 0, 0)

    def keep(self, backend_id: int, slot: int, requests: int, errors: int) -> None:
        """Keep a slot whose request ended for the next turn; write its figures meanwhile."""
        self.kept[(backend_id, slot)] = self.clock()
        self._spawn(self._record_use(backend_id, slot, requests, errors))

    async def _record_use(self, backend_id: int, slot: int, requests: int, errors: int) -> None:
        try:
            await slotstore.record_use(self.pool, backend_id, slot, requests, errors)
        except store.UNAVAILABLE_ERRORS:
            self._unrecorded.append((backend_id, slot, requests, errors))

    def take_kept(self, backend_ids: Sequence[int]) -> tuple[int, int] | None:
        """A kept slot of the first of these members that has one, with no round trip."""
        if not self.kept or not self.is_usable or self._is_reconciling:
            return None
        for backend_id in backend_ids:
            for kept in self.kept:
                if kept[0] == backend_id:
                    del self.kept[kept]
                    return kept
        return None

    def give_back_kept(self, backend_id: int | None = None, idle_for: float = 0.0) -> None:
        """Give back the kept slots (of one member only; idle for at least idle_for)."""
        now = self.clock()
        for (member_id, slot), since in list(self.kept.items()):
            if backend_id in (None, member_id) and now - since >= idle_for:
                del self.kept[(member_id, slot)]
                self.give_back(member_id, slot, 0, 0)

    def give_back(self, backend_id: int, slot: int, requests: int, errors: int) -> None:
        """Give a slot back in the background (the answer is already on its way)."""
        self.held.discard((backend_id, slot))
        self.kept.pop((backend_id, slot), None)
        self._spawn(self._give_back(backend_id, slot, requests, errors))

    async def _give_back(self, backend_id: int, slot: int, requests: int, errors: int) -> None:
        try:
            await slotstore.give_back(
                self.pool, self.gateway_id, backend_id, slot, requests, errors
            )
        except store.UNAVAILABLE_ERRORS:
            self._unreturned.append((backend_id, slot, requests, errors))

    def start_waiting(self) -> None:
        """A request waits for a shared slot; the first one marks the gateway as waiting."""
        self.waiters += 1
        if self.waiters == 1:
            self._spawn(self._mark_waiting())

    def stop_waiting(self, has_slot: bool) -> None:
        """A waiting request got its slot or gave up; the last one clears the mark."""
        self.waiters -= 1
        if not self.waiters:
            # Even with a slot: the take cleared the mark, but the first waiter's mark may
            # have landed after that take on another connection. Left set, it would hold
            # every other gateway back until the next heartbeat (up to a second).
            self._spawn(self._mark_waiting())

    async def _mark_waiting(self) -> None:
        # One at a time, in the order asked, each with the count as it is then: the last
        # one written is the true one. The heartbeat carries it each second too.
        async with self._marking:
            with contextlib.suppress(*store.UNAVAILABLE_ERRORS):
                await slotstore.set_waiting(self.pool, self.gateway_id, self.waiters > 0)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
