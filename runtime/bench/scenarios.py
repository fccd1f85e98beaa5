"""The bench from start to end: a private stack, the scenarios in order, the report.

Order matters on a small machine. Scenario 1 (and the relay cost, on the same canned
upstream and gateway) runs first, while the backend is idle, and its upstream and second
gateway are stopped before the model scenarios, so that they do not take CPU from the
model. The scale-out scenario (8) runs next, on canned upstreams of its own, then the
two-gateway scenario (9) on canned members of its own. Capacity
(7) runs last: it restarts the stack with other replica and thread counts. `--only` runs a
subset (SCENARIOS names them), in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from runtime.bench import capacity, model, overhead, relay, scaleout, twogateways
from runtime.bench.client import Target
from runtime.bench.errors import BenchError
from runtime.bench.loadgen import find_wrk
from runtime.bench.report import Report
from runtime.bench.stack import (
    OVERHEAD_CONCURRENCY,
    Stack,
    free_port,
    free_port_run,
    private_root,
    start_floor,
    start_overhead_gateway,
    start_side_gateway,
    start_upstream,
    terminate_raises,
)
from runtime.replicas import default_threads

Echo = Callable[[str], None]
# The HTTP floors of scenario 1, beside the bare pipe it shares with scenario 6.
FLOOR_FORWARDERS = (
    ("bare asyncio HTTP forwarder", "runtime.bench.rawproxy"),
    ("bare aiohttp forwarder", "runtime.bench.bareproxy"),
)
# What --only takes; "overhead" includes scenario 5 (the gateway's memory after it).
SCENARIOS = (
    "overhead",
    "relay",
    "scaleout",
    "twogateways",
    "streaming",
    "fairness",
    "restart",
    "capacity",
)


@dataclass(frozen=True)
class BenchOptions:
    """The size of a run; the defaults take about 10 minutes on 2 cores (capacity: 4)."""

    seconds: float = 10.0  # each wrk run in scenario 1, each run of scenario 9
    stream_prompts: int = 4  # scenario 2: prompts per pass (4 passes, paths alternating)
    stream_tokens: int = 64
    flood: int = 16  # scenario 3: A's requests in flight
    flood_tokens: int = 64  # each of A's requests
    probes: int = 3  # B's requests, one at a time
    restart_settle: float = 2.0  # scenario 4: steady load before and after the restart
    relay_streams: int = relay.STREAMS  # scenario 6: streams relayed
    capacity_seconds: float = 60.0  # scenario 7: each setup's run
    capacity_tokens: int = 128  # each generation in scenario 7
    scaleout_seconds: float = 10.0  # scenario 8: each backend count's run
    only: frozenset[str] = frozenset(SCENARIOS)  # the scenarios to run

    def runs(self, name: str) -> bool:
        return name in self.only


def parse_only(text: str) -> frozenset[str]:
    """--only's comma-separated names; a BenchError naming the choices for an unknown one."""
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(names - set(SCENARIOS))
    if unknown or not names:
        raise BenchError(
            f"--only takes scenario names separated by commas, from: {', '.join(SCENARIOS)} "
            f"(got {text!r})"
        )
    return names


def run_bench(options: BenchOptions, echo: Echo) -> Report:
    """Run every scenario against a private stack; every process is stopped on the way out."""
    if options.runs("overhead"):
        find_wrk()  # fail in a second, not after the stack has started
    started = time.monotonic()
    report = Report(settings=asdict(options))
    report.settings["cpus"] = os.cpu_count()
    report.settings["only"] = [name for name in SCENARIOS if options.runs(name)]  # JSON: no sets
    with terminate_raises(), private_root() as root, contextlib.ExitStack() as exits:
        stack = Stack(root, exits)
        echo(f"starting a private stack in {root} (database, backend, gateway)")
        stack.start()
        keys = {name: stack.create_user(name) for name in ("bench", "user-a", "user-b")}
        if options.runs("overhead") or options.runs("relay"):
            with contextlib.ExitStack() as scenario_1:
                run_overhead(stack, keys["bench"], options, report, echo, scenario_1)
        if options.runs("scaleout"):
            run_scaleout(stack, keys["bench"], options, report, echo)
        if options.runs("twogateways"):
            figures = twogateways.measure_two_gateways(stack, keys["bench"], options.seconds, echo)
            rows, note = twogateways.two_gateway_report(figures)
            report.rows += rows
            report.notes.append(note)
        direct = Target("direct", stack.backend_url, stack.backend_key)
        gateway = Target("gateway", stack.gateway_url, keys["bench"])
        if options.runs("streaming"):
            echo("scenario 2: streaming with the real model")
            report.rows += asyncio.run(
                model.measure_streaming(
                    direct, gateway, options.stream_prompts, options.stream_tokens
                )
            )
        if options.runs("fairness"):
            run_fairness(stack, keys, options, report, echo)
        if options.runs("restart"):
            run_restart(stack, direct, gateway, options, report, echo)
        if options.runs("capacity"):
            run_capacity(stack, options, report, echo)
        echo("stopping the private stack")
    report.wall_seconds = time.monotonic() - started
    return report


def run_overhead(
    stack: Stack,
    key: str,
    options: BenchOptions,
    report: Report,
    echo: Echo,
    exits: contextlib.ExitStack,
) -> None:
    """Scenarios 1, 6 and 5 (as chosen); the upstream and its gateway stop when `exits` closes."""
    upstream_port = start_upstream(exits)
    gateway_url, gateway_pid = start_overhead_gateway(stack, upstream_port, exits)
    pipe_url, pipe_pid = start_floor(exits, "runtime.bench.pipe", upstream_port)
    if options.runs("overhead"):
        echo(
            f"scenario 1: overhead against a canned upstream (wrk, {options.seconds:.0f}s per run)"
        )
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        floors = [overhead.Floor("bare Python TCP pipe", pipe_url)]
        for label, module in FLOOR_FORWARDERS:
            floors.append(overhead.Floor(label, start_floor(exits, module, upstream_port)[0]))
        report.rows += overhead.measure_overhead(
            upstream_url, gateway_url, floors, key, options.seconds
        )
    if options.runs("relay"):
        echo(f"scenario 6: {relay.DESCRIPTION}")
        report.rows += relay.measure_relay(
            gateway_url, key, gateway_pid, pipe_url, pipe_pid, options.relay_streams
        )
    if not options.runs("overhead"):
        return
    report.rows.append(overhead.memory_row(gateway_pid))
    report.notes.append(
        f"scenario 1: the gateway runs with auth, rate limit (set high enough never to trip), "
        f"fair queue and request log on; LLAMA_PROXY_BACKEND_CONCURRENCY={OVERHEAD_CONCURRENCY} "
        f"so that its queue admits all {overhead.SATURATING_CONNECTIONS} connections; wrk "
        f"uses 1 thread"
    )


def run_restart(
    stack: Stack, direct: Target, gateway: Target, options: BenchOptions, report: Report, echo: Echo
) -> None:
    echo("scenario 4: ./console.sh restart under a steady request stream")
    rows, note = asyncio.run(
        model.measure_restart(
            direct, gateway, stack.console_command("restart"), stack.env, options.restart_settle
        )
    )
    report.rows += rows
    report.notes.append(note)


def run_fairness(
    stack: Stack, keys: dict[str, str], options: BenchOptions, report: Report, echo: Echo
) -> None:
    echo(
        f"scenario 3: fairness, A keeps {options.flood} requests of {options.flood_tokens} "
        f"tokens in flight, B sends {options.probes} short ones"
    )
    plan = model.Fairness(options.flood, options.flood_tokens, options.probes)
    direct = Target("direct", stack.backend_url, stack.backend_key)
    user_a = Target("gateway", stack.gateway_url, keys["user-a"])
    user_b = Target("gateway", stack.gateway_url, keys["user-b"])
    report.rows += asyncio.run(model.measure_fairness(direct, user_a, user_b, plan))


def run_scaleout(stack: Stack, key: str, options: BenchOptions, report: Report, echo: Echo) -> None:
    echo(
        f"scenario 8: scale-out, 1 to {max(scaleout.BACKENDS)} canned backends of "
        f"{scaleout.SERVICE_SECONDS * 1000:.0f} ms at concurrency 1 "
        f"({options.scaleout_seconds:.0f}s each)"
    )
    rates: dict[int, float] = {}
    with contextlib.ExitStack() as exits:
        gateway_port = free_port()
        first = free_port_run(max(scaleout.BACKENDS), avoid=gateway_port)
        service = ("--service-seconds", str(scaleout.SERVICE_SECONDS))
        start_upstream(exits, "--count", str(max(scaleout.BACKENDS)), *service, port=first)
        for count in scaleout.BACKENDS:
            with contextlib.ExitStack() as gateway_exits:
                overrides = {"LLAMA_SERVER_REPLICAS": str(count), "LLAMA_N_THREADS": "1"}
                url, _ = start_side_gateway(
                    stack, f"scaleout-{count}", first, overrides, gateway_exits, gateway_port
                )
                clients = scaleout.CLIENTS_PER_BACKEND * count
                target = Target("gateway", url, key)
                rates[count] = asyncio.run(
                    scaleout.throughput(target, clients, options.scaleout_seconds)
                )
    report.rows += scaleout.scaleout_rows(rates)
    report.notes.append(
        f"scenario 8: {scaleout.CLIENTS_PER_BACKEND} clients per backend, each sending one "
        f"request after another through one gateway (LLAMA_PROXY_BACKEND_CONCURRENCY=1); "
        f"the direct column is linear: N x the 1-backend figure"
    )


def run_capacity(stack: Stack, options: BenchOptions, report: Report, echo: Echo) -> None:
    users = [stack.create_user(f"capacity-{i}") for i in range(1, capacity.USERS + 1)]
    targets = [Target("gateway", stack.gateway_url, key) for key in users]
    setups = capacity.setups_for(default_threads(1))

    def reconfigure(setup: capacity.Setup) -> None:
        echo(
            f"scenario 7: capacity, {setup.label}: {capacity.USERS} users, "
            f"{options.capacity_tokens}-token generations for {options.capacity_seconds:.0f}s"
        )
        if setup is setups[0]:
            return  # the stack as started: 1 replica, every core's threads
        is_new_threads = stack.env.get("LLAMA_N_THREADS") != str(setup.threads)
        stack.env["LLAMA_SERVER_REPLICAS"] = str(setup.replicas)
        stack.env["LLAMA_N_THREADS"] = str(setup.threads)
        # restart re-runs every replica with the new threads; start only adds replicas.
        stack.console("restart" if is_new_threads else "start")

    rows, _ = capacity.measure_capacity(
        setups,
        reconfigure,
        targets,
        stack.dsn(),
        options.capacity_tokens,
        options.capacity_seconds,
    )
    report.rows += rows
    report.notes.append(
        "scenario 7: all through the gateway; the direct column is 1 replica x 1 thread, the "
        "llamagate column 2 replicas x 1 thread; queue waits are the gateway's own queue_ms"
    )
