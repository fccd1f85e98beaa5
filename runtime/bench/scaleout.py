"""Scenario 8, scale-out: does the gateway's dispatch turn N backends into N times the
throughput?

Canned backends (runtime/bench/upstream.py --service-seconds) each answer one request at
a time in SERVICE_SECONDS, as a model would, so one backend serves 1 / SERVICE_SECONDS
requests per second and N backends could serve N times that. A real gateway in front of
the first N of them gets twice as many clients as backends, each sending one request after
another, so that every backend always has a request waiting. The figure is requests/s
through the gateway against linear (N x the 1-backend figure).
"""

from __future__ import annotations

import asyncio
import time

from runtime.bench.client import Target, chat, new_session, whole
from runtime.bench.report import RATIO, Row

SERVICE_SECONDS = 0.2
BACKENDS = (1, 2, 4, 8)
CLIENTS_PER_BACKEND = 2
MIN_LINEAR_SHARE = 0.9


async def throughput(target: Target, clients: int, seconds: float) -> float:
    """Requests/s answered by `clients` clients looping one request each for `seconds`.

    Requests started before the end run to their end, and the clock includes them.
    """
    deadline = time.perf_counter() + seconds

    async def one_client(session, slot: int) -> int:
        answered = 0
        while time.perf_counter() < deadline:
            await whole(session, target, "/v1/chat/completions", chat("Hi.", 4, slot))
            answered += 1
        return answered

    started = time.perf_counter()
    async with new_session(clients + 4) as session:
        answered = await asyncio.gather(*(one_client(session, slot) for slot in range(clients)))
    return sum(answered) / (time.perf_counter() - started)


def scaleout_rows(rates: dict[int, float]) -> list[Row]:
    """One row per backend count: linear ("direct" column) against what the gateway did."""
    single = rates[1]
    rows = [
        Row("8 scale-out", f"1 backend, requests/s ({SERVICE_SECONDS * 1000:.0f} ms each)",
            "req/s", 1 / SERVICE_SECONDS, single, RATIO),
    ]  # fmt: skip
    for count, rate in rates.items():
        if count == 1:
            continue
        linear = count * single
        rows.append(
            Row("8 scale-out", f"{count} backends, requests/s against linear", "req/s", linear,
                rate, RATIO, f">= {MIN_LINEAR_SHARE}x", rate >= MIN_LINEAR_SHARE * linear)
        )  # fmt: skip
    return rows
