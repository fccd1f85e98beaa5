"""Scenario 9 from start to end: two gateways on one database sharing two members.

The order keeps each figure clean. Run A has one gateway alone with the members (the
second starts only after it); run B adds the second on the same database and splits the
same clients between them. Then the slow members make way for one fast member, and the
added latency alternates between the first gateway (that member, shared) and a third
gateway (the same upstream as its local replica). Each member's overlap count is taken
before a run (a fresh start) and after it. The members are removed however it ends, so
that no other scenario's gateway sends them anything.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from runtime.bench import sharedfigures
from runtime.bench.client import Target
from runtime.bench.sharedfigures import (
    CLIENTS_PER_MEMBER,
    MEMBERS,
    SERVICE_SECONDS,
    Overlaps,
    Throughput,
    TwoGatewayFigures,
    alternating_latencies,
    throughput,
)
from runtime.bench.sharedstack import (
    SharedMember,
    register_members,
    remove_members,
    start_member_gateway,
    start_replica_gateway,
    take_overlaps,
    wait_for_members,
)
from runtime.bench.stack import Stack, free_port_run, start_upstream

Echo = Callable[[str], None]
SLOW_NAMES = [f"bench-slow-{number}" for number in range(1, MEMBERS + 1)]
FAST_NAME = "bench-fast"


def measure_two_gateways(stack: Stack, key: str, seconds: float, echo: Echo) -> TwoGatewayFigures:
    """Runs A and B, then the added latency; every process and member is gone afterwards."""
    with contextlib.ExitStack() as exits:
        first_slow = free_port_run(MEMBERS, avoid=stack.gateway_port)
        start_upstream(exits, "--count", str(MEMBERS), "--service-seconds", str(SERVICE_SECONDS),
                       port=first_slow)  # fmt: skip
        fast_port = start_upstream(exits)
        slow_ports = [first_slow + offset for offset in range(MEMBERS)]
        exits.callback(remove_members, stack, [*SLOW_NAMES, FAST_NAME])
        register_members(
            stack,
            [
                SharedMember(name, f"http://127.0.0.1:{port}")
                for name, port in zip(SLOW_NAMES, slow_ports, strict=True)
            ],
        )
        first = Target("gateway", start_member_gateway(stack, "twogw-1", exits, MEMBERS), key)
        runs = run_a_and_b(stack, first, slow_ports, seconds, echo)
        echo("scenario 9: added latency of a shared slot, 1 client, local and shared in turn")
        remove_members(stack, SLOW_NAMES)
        register_members(stack, [SharedMember(FAST_NAME, f"http://127.0.0.1:{fast_port}")])
        wait_for_members(first.url, 1)
        local_url = start_replica_gateway(stack, "twogw-local", fast_port, exits)
        wait_for_members(local_url, 0)  # it cannot open the member's key: its replica only
        local = Target("gateway", local_url, key)
        latencies = asyncio.run(alternating_latencies(local, first, seconds))
    return TwoGatewayFigures(*runs, latencies)


def run_a_and_b(
    stack: Stack, first: Target, slow_ports: list[int], seconds: float, echo: Echo
) -> tuple[Throughput, Throughput, list[Overlaps], list[Overlaps]]:
    """Run A through `first` alone, then run B through it and a second gateway that stops
    afterwards: each run's throughput, then each run's overlaps per member."""
    clients = CLIENTS_PER_MEMBER * MEMBERS
    echo(f"scenario 9: run A, {clients} clients through 1 gateway ({seconds:.0f}s)")
    take_overlaps(slow_ports)  # counting starts afresh
    one = asyncio.run(throughput([first], clients, seconds))
    overlaps_one = take_overlaps(slow_ports)
    with contextlib.ExitStack() as exits:
        second = Target(
            "gateway", start_member_gateway(stack, "twogw-2", exits, MEMBERS), first.key
        )
        echo(f"scenario 9: run B, the same clients split over 2 gateways ({seconds:.0f}s)")
        two = asyncio.run(throughput([first, second], clients, seconds))
        overlaps_two = take_overlaps(slow_ports)
    return one, two, overlaps_one, overlaps_two


def two_gateway_report(figures: TwoGatewayFigures) -> tuple[list, str]:
    """The rows of scenario 9 and its note."""
    note = (
        f"scenario 9: {MEMBERS} canned members of {SERVICE_SECONDS * 1000:.0f} ms at "
        f"concurrency 1, shared through PostgreSQL by gateways with no local replica; "
        f"{CLIENTS_PER_MEMBER * MEMBERS} clients each sending one request after another; "
        f"overlaps are counted by the members themselves; the latency rows alternate one "
        f"client's requests between a fast canned upstream as a shared member and as "
        f"another gateway's local replica; PostgreSQL as the console runs it (fsync and "
        f"synchronous commit on; the gateways' leases commit asynchronously)"
    )
    return sharedfigures.twogateway_rows(figures), note
