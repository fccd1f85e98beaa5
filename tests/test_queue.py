"""The fair queue: round-robin across users, FIFO within one, caps, timeout, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from proxy.queue import FairQueue, QueueFull, QueueStats, QueueTimeout

DEADLINE = 5.0  # seconds; only there so a broken queue fails instead of hanging


def make_queue(**overrides) -> FairQueue:
    settings = dict(concurrency=1, max_waiting_per_user=50, max_waiting_total=100, timeout=60.0)
    return FairQueue(**(settings | overrides))


class FakeClock:
    """A clock the test moves by hand, so hold times are exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def wait_until(condition: Callable[[], bool]) -> None:
    """Let the event loop run until condition() holds, failing at the deadline."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(poll(), DEADLINE)


async def hold(queue: FairQueue, user: str, name: str, order: list[str], gate: asyncio.Event):
    """Take a slot, note the grant, and keep the slot until the gate opens."""
    async with queue.slot(user):
        order.append(name)
        await gate.wait()


async def queue_up(
    queue: FairQueue, names: list[tuple[str, str]], order: list[str], gate: asyncio.Event
) -> list[asyncio.Task]:
    """Start one holder per (user, name), each only once the last has a slot or a place in line."""
    tasks = []
    for user, name in names:
        before = queue.stats()
        tasks.append(asyncio.create_task(hold(queue, user, name, order, gate)))
        await wait_until(lambda b=before: queue.stats() != b)
    return tasks


async def refusal(queue: FairQueue, user: str) -> QueueFull:
    """The QueueFull that a new request from user gets instead of a place in the queue."""

    async def enter() -> None:
        async with queue.slot(user):
            pytest.fail(f"a request from {user} was admitted over a cap")

    with pytest.raises(QueueFull) as refused:
        await asyncio.wait_for(enter(), DEADLINE)
    return refused.value


async def run_to_end(tasks: list[asyncio.Task], gate: asyncio.Event) -> None:
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)


@pytest.mark.asyncio
async def test_a_single_request_waits_behind_at_most_one_of_a_flooders():
    queue, order, gate = make_queue(), [], asyncio.Event()
    flood = [("a", f"a{i}") for i in range(16)]
    tasks = await queue_up(queue, flood, order, gate)
    assert queue.stats().waiting_by_user == {"a": 15}

    tasks += await queue_up(queue, [("b", "b")], order, gate)
    await run_to_end(tasks, gate)

    assert order[:2] == ["a0", "b"]
    assert order[2:] == [f"a{i}" for i in range(1, 16)]


@pytest.mark.asyncio
async def test_turns_go_round_robin_across_users_whatever_the_arrival_order():
    queue, order, gate = make_queue(), [], asyncio.Event()
    arrivals = [("a", "a1"), ("a", "a2"), ("a", "a3")]
    arrivals += [("b", "b1"), ("b", "b2"), ("b", "b3"), ("c", "c1"), ("c", "c2"), ("c", "c3")]
    tasks = await queue_up(queue, arrivals, order, gate)
    await run_to_end(tasks, gate)

    assert order == ["a1", "b1", "c1", "a2", "b2", "c2", "a3", "b3", "c3"]


@pytest.mark.asyncio
async def test_one_users_requests_are_served_first_in_first_out():
    queue, order, gate = make_queue(), [], asyncio.Event()
    names = [f"a{i}" for i in range(6)]
    tasks = await queue_up(queue, [("a", name) for name in names], order, gate)
    await run_to_end(tasks, gate)

    assert order == names


@pytest.mark.asyncio
async def test_concurrency_two_admits_two_at_once_and_queues_the_third():
    queue, order, gate = make_queue(concurrency=2), [], asyncio.Event()
    tasks = await queue_up(queue, [("a", "a1"), ("b", "b1")], order, gate)
    assert order == ["a1", "b1"]
    assert queue.stats() == QueueStats(active=2, waiting=0, waiting_by_user={})

    tasks += await queue_up(queue, [("c", "c1")], order, gate)
    assert queue.stats() == QueueStats(active=2, waiting=1, waiting_by_user={"c": 1})
    await run_to_end(tasks, gate)
    assert order == ["a1", "b1", "c1"]


@pytest.mark.asyncio
async def test_a_user_over_their_waiting_cap_gets_429_at_once():
    queue, order, gate = make_queue(max_waiting_per_user=2), [], asyncio.Event()
    tasks = await queue_up(queue, [("a", "a0"), ("a", "a1"), ("a", "a2")], order, gate)

    refused = await refusal(queue, "a")
    assert (refused.scope, refused.status) == ("user", 429)
    assert refused.retry_after >= 1

    tasks += await queue_up(queue, [("b", "b1")], order, gate)  # the cap is per user
    assert queue.stats().waiting_by_user == {"a": 2, "b": 1}
    await run_to_end(tasks, gate)


@pytest.mark.asyncio
async def test_a_full_queue_gives_503_to_everyone():
    queue, order, gate = (
        make_queue(max_waiting_per_user=2, max_waiting_total=3),
        [],
        asyncio.Event(),
    )
    arrivals = [("a", "a0"), ("a", "a1"), ("a", "a2"), ("b", "b1")]
    tasks = await queue_up(queue, arrivals, order, gate)

    refused = await refusal(queue, "c")
    assert (refused.scope, refused.status) == ("total", 503)
    assert refused.retry_after >= 1
    await run_to_end(tasks, gate)


@pytest.mark.asyncio
async def test_a_request_that_waits_too_long_times_out_and_leaves_the_queue():
    queue = make_queue(timeout=0.05)
    async with queue.slot("a"):
        with pytest.raises(QueueTimeout) as refused:
            async with queue.slot("b"):
                pytest.fail("a request got a slot that was never freed")
        assert refused.value.status == 503
        assert refused.value.retry_after >= 1
        assert queue.stats() == QueueStats(active=1, waiting=0, waiting_by_user={})
    assert queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})


@pytest.mark.asyncio
async def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_gets_the_slot():
    queue, order, gate = make_queue(), [], asyncio.Event()
    arrivals = [("a", "a0"), ("b", "b1"), ("c", "c1")]
    holder, gone, survivor = await queue_up(queue, arrivals, order, gate)

    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert queue.stats().waiting_by_user == {"c": 1}

    await run_to_end([holder, survivor], gate)
    assert order == ["a0", "c1"]
    assert queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})


@pytest.mark.asyncio
async def test_a_waiter_cancelled_just_before_the_slot_frees_is_skipped():
    queue, order, gate = make_queue(), [], asyncio.Event()
    async with queue.slot("a"):
        gone, next_one = await queue_up(queue, [("b", "b1"), ("c", "c1")], order, gate)
        gone.cancel()  # its task has not run yet when the slot frees below
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(gone, DEADLINE)
    await asyncio.wait_for(next_one, DEADLINE)

    assert order == ["c1"]
    assert queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})


@pytest.mark.asyncio
async def test_a_waiter_cancelled_as_it_is_granted_passes_the_slot_on():
    queue, order, gate = make_queue(), [], asyncio.Event()
    async with queue.slot("a"):
        racer, next_one = await queue_up(queue, [("b", "b1"), ("c", "c1")], order, gate)
    # Leaving the block granted the slot to b1; cancel it before it can run.
    racer.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(racer, DEADLINE)
    await asyncio.wait_for(next_one, DEADLINE)

    assert order == ["c1"]
    assert queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})
    async with queue.slot("d") as waited:
        assert waited == 0.0


@pytest.mark.asyncio
async def test_a_lone_waiter_cancelled_as_it_is_granted_does_not_leak_the_slot():
    queue, order, gate = make_queue(), [], asyncio.Event()
    async with queue.slot("a"):
        (racer,) = await queue_up(queue, [("b", "b1")], order, gate)
    racer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(racer, DEADLINE)

    assert order == []
    assert queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})


@pytest.mark.asyncio
async def test_an_exception_inside_the_slot_releases_it_to_the_next_waiter():
    queue, order, gate = make_queue(), [], asyncio.Event()
    with pytest.raises(RuntimeError):
        async with queue.slot("a"):
            (waiter,) = await queue_up(queue, [("b", "b1")], order, gate)
            raise RuntimeError("the backend call failed")
    await run_to_end([waiter], gate)

    assert order == ["b1"]
    assert queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})


@pytest.mark.asyncio
async def test_the_wait_time_is_measured_from_arrival_to_grant():
    clock = FakeClock()
    queue, waited = make_queue(clock=clock), []

    async def wait_and_note():
        async with queue.slot("b") as seconds:
            waited.append(seconds)

    async with queue.slot("a") as seconds:
        assert seconds == 0.0
        waiter = asyncio.create_task(wait_and_note())
        await wait_until(lambda: queue.stats().waiting == 1)
        clock.now += 7.5
    await asyncio.wait_for(waiter, DEADLINE)
    assert waited == [7.5]


@pytest.mark.asyncio
async def test_retry_after_follows_hold_times_and_grows_with_the_queue():
    clock = FakeClock()
    queue, order, gate = make_queue(clock=clock, max_waiting_per_user=1), [], asyncio.Event()
    for _ in range(50):  # enough holds of 10 s for the average to settle on 10 s
        async with queue.slot("warmup"):
            clock.now += 10.0

    tasks = await queue_up(queue, [("a", "a0"), ("b", "b1")], order, gate)
    short_queue = await refusal(queue, "b")
    tasks += await queue_up(queue, [(u, f"{u}1") for u in "cdef"], order, gate)
    long_queue = await refusal(queue, "b")
    await run_to_end(tasks, gate)

    # One running plus one waiting ahead at 10 s each; then one running plus five waiting.
    assert short_queue.retry_after == 20
    assert long_queue.retry_after == 60


# --- per-user concurrency caps -------------------------------------------------------------


class Holders:
    """Requests that each keep their slot until released one by one, noting what they saw."""

    def __init__(self, queue: FairQueue) -> None:
        self.queue = queue
        self.order: list[str] = []  # names, in the order they were granted
        self.gates: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.holding: dict[str, int] = {}  # user -> slots held right now
        self.peak: dict[str, int] = {}  # user -> most slots held at once

    async def arrive(self, user: str, name: str, cap: int = 0) -> None:
        """Start a request; return once it holds a slot or waits in line."""
        before = self.queue.stats()
        self.gates[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self._hold(user, name, cap))
        await wait_until(lambda: self.queue.stats() != before)

    async def _hold(self, user: str, name: str, cap: int) -> None:
        async with self.queue.slot(user, cap):
            self.order.append(name)
            self.holding[user] = self.holding.get(user, 0) + 1
            self.peak[user] = max(self.peak.get(user, 0), self.holding[user])
            await self.gates[name].wait()
            self.holding[user] -= 1

    async def finish(self, name: str) -> None:
        self.gates[name].set()
        await asyncio.wait_for(self.tasks[name], DEADLINE)


@pytest.mark.asyncio
async def test_a_user_at_their_cap_waits_while_another_user_takes_the_free_slot():
    holders = Holders(make_queue(concurrency=2))
    await holders.arrive("a", "a1", cap=1)
    await holders.arrive("a", "a2", cap=1)
    assert holders.order == ["a1"]
    assert holders.queue.stats() == QueueStats(active=1, waiting=1, waiting_by_user={"a": 1})

    await holders.arrive("b", "b1")  # arrived after a2, served before it: a is at its cap
    assert holders.order == ["a1", "b1"]
    assert holders.queue.stats() == QueueStats(active=2, waiting=1, waiting_by_user={"a": 1})

    await holders.finish("a1")
    await wait_until(lambda: holders.order == ["a1", "b1", "a2"])
    for name in ("b1", "a2"):
        await holders.finish(name)
    assert holders.peak == {"a": 1, "b": 1}
    assert holders.queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})


@pytest.mark.asyncio
async def test_a_capped_users_burst_is_served_in_full_never_more_at_once_than_the_cap():
    holders = Holders(make_queue(concurrency=4))
    for i in range(6):
        await holders.arrive("a", f"a{i}", cap=2)
    assert holders.order == ["a0", "a1"]
    assert holders.queue.stats() == QueueStats(active=2, waiting=4, waiting_by_user={"a": 4})

    for i in range(6):
        await holders.finish(f"a{i}")
    assert holders.order == [f"a{i}" for i in range(6)]  # none refused, first in first out
    assert holders.peak == {"a": 2}


@pytest.mark.asyncio
async def test_when_the_next_user_in_turn_is_at_their_cap_the_slot_goes_to_the_one_after():
    holders = Holders(make_queue(concurrency=2))
    await holders.arrive("a", "a1", cap=1)
    await holders.arrive("c", "c0")  # granted after a1: a's turn comes before c's next
    await holders.arrive("a", "a2", cap=1)
    await holders.arrive("c", "c1")
    await holders.finish("c0")  # a2 is next in turn, but a still holds a1
    await wait_until(lambda: holders.order[-1] == "c1")
    assert holders.queue.stats().waiting_by_user == {"a": 1}

    await holders.finish("a1")
    await wait_until(lambda: holders.order[-1] == "a2")
    for name in ("c1", "a2"):
        await holders.finish(name)
    assert holders.order == ["a1", "c0", "c1", "a2"]
    assert holders.peak == {"a": 1, "c": 1}


@pytest.mark.asyncio
async def test_a_raised_cap_lets_the_users_waiting_requests_in_at_once():
    holders = Holders(make_queue(concurrency=3))
    await holders.arrive("a", "a1", cap=1)
    await holders.arrive("a", "a2", cap=1)
    assert holders.order == ["a1"]

    await holders.arrive("a", "a3", cap=3)  # set-limit raised the cap meanwhile
    await wait_until(lambda: len(holders.order) == 3)
    assert holders.queue.stats() == QueueStats(active=3, waiting=0, waiting_by_user={})
    for name in ("a1", "a2", "a3"):
        await holders.finish(name)
    assert holders.queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})


@pytest.mark.asyncio
async def test_a_capped_request_still_times_out_and_the_next_request_brings_the_new_cap():
    queue = make_queue(concurrency=2, timeout=0.05)
    async with queue.slot("a", cap=1):
        with pytest.raises(QueueTimeout):
            async with queue.slot("a", cap=1):
                pytest.fail("a request got a slot over its user's cap")
        assert queue.stats() == QueueStats(active=1, waiting=0, waiting_by_user={})
    # The user's next request, with no cap, takes both slots at once.
    async with queue.slot("a"), queue.slot("a") as waited:
        assert waited == 0.0
    assert queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})


@pytest.mark.asyncio
async def test_a_raised_capacity_admits_waiters_at_once_and_a_lowered_one_holds_new_turns():
    queue, order, gate = make_queue(concurrency=1), [], asyncio.Event()
    tasks = await queue_up(queue, [("a", "a1"), ("b", "b1"), ("c", "c1")], order, gate)
    assert queue.stats().waiting == 2
    queue.set_capacity(2)  # a shared member joined the pool
    await wait_until(lambda: order == ["a1", "b1"])
    queue.set_capacity(1)  # it left: both keep their turns, c waits for both to end
    assert queue.stats() == QueueStats(active=2, waiting=1, waiting_by_user={"c": 1})
    await run_to_end(tasks, gate)
    assert order == ["a1", "b1", "c1"]
    assert queue.stats() == QueueStats(active=0, waiting=0, waiting_by_user={})
