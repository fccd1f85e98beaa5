"""The replicas of llama_cpp.server on this host: each one's port, files, threads and GPU.

llama_cpp.server generates for one request at a time, so more processes of the same model
are how one host serves more users at once; the gateway spreads requests over them.

- Replica i listens on LLAMA_SERVER_PORT + i, except that the gateway's port is skipped:
  the defaults (8000 and 8001) would otherwise put replica 1 on the gateway's port.
- Replica 0 keeps the file names of a single backend (run/backend.pid, logs/backend.log),
  so that a running install from before replicas is still recognised; replica i > 0 is
  backend-i (run/backend-1.pid, logs/backend-1.log).
- The rules that span keys (how many GPUs, the highest port, single-key mode) are checked
  here, when the settings are loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRIMARY_NAME = "backend"
HIGHEST_PORT = 65535
_NAME_PATTERN = re.compile(rf"^{PRIMARY_NAME}(?:-(\d+))?$")


@dataclass(frozen=True)
class Replica:
    """One llama_cpp.server process of the pool: where it listens and what it may use."""

    index: int
    host: str
    port: int
    url: str
    threads: int | None = None
    gpu: str = ""  # its CUDA_VISIBLE_DEVICES; "" leaves the environment's as they are

    @property
    def name(self) -> str:
        """The stem of its pid and log files, and its name in status."""
        return replica_name(self.index)


def replica_name(index: int) -> str:
    return PRIMARY_NAME if index == 0 else f"{PRIMARY_NAME}-{index}"


def index_of_name(stem: str) -> int | None:
    """The replica a file stem names ("backend" is 0, "backend-2" is 2); None for others."""
    found = _NAME_PATTERN.match(stem)
    if found is None:
        return None
    return int(found.group(1) or 0)


def indexes_on_disk(run_dir: Path) -> list[int]:
    """The replicas that have a pid file, whatever the configuration says now (a shrink)."""
    if not run_dir.is_dir():
        return []
    found = (index_of_name(path.stem) for path in run_dir.glob(f"{PRIMARY_NAME}*.pid"))
    return sorted(index for index in found if index is not None)


def replica_ports(first_port: int, count: int, skipped_port: int | None = None) -> list[int]:
    """The ports of replicas 0 to count-1: consecutive from first_port, without skipped_port."""
    ports: list[int] = []
    port = first_port
    while len(ports) < count:
        if port != skipped_port:
            ports.append(port)
        port += 1
    return ports


def default_threads(replicas: int, cpu_count: int | None = None) -> int:
    """Threads per replica when LLAMA_N_THREADS is empty: the cores divided among the replicas.

    The cores this process may run on (its affinity mask, as taskset or a cpuset sets it),
    not the machine's: more threads than cores makes llama.cpp's threads wait on each other.
    """
    cores = cpu_count if cpu_count is not None else len(os.sched_getaffinity(0))
    return max(1, cores // replicas)


def replica_problem(
    values: Mapping[str, Any], where: Callable[[str], str], is_backend_only: bool = False
) -> str | None:
    """What is wrong with the replica settings taken together, as an error message; or None.

    where(key) says where a key's value came from: "in FILE", "from the environment".
    is_backend_only: `start --backend-only`, which runs the replicas without a gateway.
    """
    count = values["LLAMA_SERVER_REPLICAS"]

    def named(key: str, shown: str) -> str:
        return f"{key}={shown} ({where(key)})"

    replicas = named("LLAMA_SERVER_REPLICAS", str(count))
    if count == 0:
        return _no_replica_problem(values, replicas, named, is_backend_only)
    gpus = values["LLAMA_REPLICA_GPUS"]
    if gpus and len(gpus) != count:
        return (
            f"{named('LLAMA_REPLICA_GPUS', ','.join(gpus))} names {len(gpus)} GPU(s) for "
            f"{replicas}; give one GPU per replica (e.g. "
            f"{','.join(str(i) for i in range(count))}), or leave it empty"
        )
    if count == 1:
        return None
    if not values["LLAMA_PROXY_ENABLED"] and not is_backend_only:
        return (
            f"{replicas} needs the gateway to spread requests over the replicas, but "
            f"{named('LLAMA_PROXY_ENABLED', '0')} is single-key mode, where clients call "
            f"one backend directly; set LLAMA_SERVER_REPLICAS=1, or LLAMA_PROXY_ENABLED=1"
        )
    first = values["LLAMA_SERVER_PORT"]
    # Without a gateway on this host its port is not skipped (Settings.replica).
    skipped = None if is_backend_only else values["LLAMA_PROXY_PORT"]
    last = replica_ports(first, count, skipped)[-1]
    if last > HIGHEST_PORT:
        return (
            f"{replicas} needs ports {first} to {last} from "
            f"{named('LLAMA_SERVER_PORT', str(first))}, beyond the highest port "
            f"{HIGHEST_PORT}; lower LLAMA_SERVER_PORT or LLAMA_SERVER_REPLICAS"
        )
    return None


def _no_replica_problem(
    values: Mapping[str, Any],
    replicas: str,
    named: Callable[[str, str], str],
    is_backend_only: bool,
) -> str | None:
    """LLAMA_SERVER_REPLICAS=0 makes a gateway-only host; with anything else it serves nothing."""
    if is_backend_only:
        return (
            f"--backend-only starts only this host's replicas of llama_cpp.server, but "
            f"{replicas} asks for none; set LLAMA_SERVER_REPLICAS to 1 or more on a host "
            f"that generates, or start without --backend-only (./console.sh start "
            f"--no-backend-only) for a gateway-only host"
        )
    if not values["LLAMA_PROXY_ENABLED"]:
        return (
            f"{replicas} runs no llama_cpp.server here, but "
            f"{named('LLAMA_PROXY_ENABLED', '0')} is single-key mode, where clients call "
            f"this host's backend directly; set LLAMA_SERVER_REPLICAS=1, or "
            f"LLAMA_PROXY_ENABLED=1 for a gateway-only host"
        )
    return None
