"""proxy/readiness.py: /readyz's checks are cached for about a second and shared."""

from __future__ import annotations

import asyncio

import pytest
from gatewayhelpers import DEADLINE

from proxy import appkeys
from proxy.readiness import ReadinessCache

pytest_plugins = ["gatewayfixture"]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_concurrent_callers_share_one_check_and_it_runs_again_once_old():
    clock, calls, release = Clock(), [], asyncio.Event()

    async def check() -> dict[str, str]:
        calls.append(clock.now)
        await release.wait()
        return {"backend": "ok"}

    cache = ReadinessCache(check, max_age=1.0, clock=clock)
    waiting = [asyncio.create_task(cache.get()) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*waiting), DEADLINE) == [{"backend": "ok"}] * 5
    clock.now = 0.9
    await cache.get()
    assert calls == [0.0]
    clock.now = 1.0
    await cache.get()
    assert calls == [0.0, 1.0]


@pytest.mark.asyncio
async def test_a_caller_that_hangs_up_does_not_cancel_the_shared_check():
    release = asyncio.Event()

    async def check() -> dict[str, str]:
        await release.wait()
        return {"database": "ok"}

    cache = ReadinessCache(check)
    first, second = asyncio.create_task(cache.get()), asyncio.create_task(cache.get())
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await asyncio.wait_for(second, DEADLINE) == {"database": "ok"}


@pytest.mark.asyncio
async def test_readyz_reads_the_pool_and_never_probes_the_backend_itself(gateway, upstream):
    # The pool's own probes (proxy/probe.py) are the only ones; stopped here, none come.
    await gateway.app[appkeys.PROBER].stop()
    probes = upstream.probes
    answers = await asyncio.gather(*(gateway.get("/readyz") for _ in range(5)))
    answers.append(await gateway.get("/readyz"))
    assert [answer.status for answer in answers] == [200] * 6
    assert upstream.probes == probes
    assert upstream.seen == []
