"""proxy/dispatch.py against a fake upstream, without a gateway around it."""

from __future__ import annotations

import aiohttp
import pytest
from fakeupstream import FakeUpstream

from proxy.dispatch import Dispatcher
from proxy.pool import BackendPool


@pytest.mark.asyncio
async def test_a_down_backend_that_answers_a_last_resort_request_is_back_in_the_pool(
    aiohttp_server,
):
    server = await aiohttp_server(FakeUpstream().make_app())
    pool = BackendPool([str(server.make_url("")).rstrip("/")], slots=1)
    [backend] = pool.backends
    pool.mark_down(backend, "refused")  # as a rolling restart leaves it, before its probe
    async with aiohttp.ClientSession() as session:
        dispatcher = Dispatcher(session, pool, wait_seconds=1, restart_flag=None)
        lease, response = await dispatcher.send("POST", "/v1/chat/completions", b"{}", {})
        response.close()
        dispatcher.close()
    pool.release(lease, is_failed=False)
    assert response.status == 200
    # Turns go to it again at once, not only after its next probe (up to a second later).
    assert (backend.is_up, backend.problem) == (True, "")
