"""The gateway as a real `python -m proxy` process, and what /proc says about it.

The load tests measure file descriptors and memory, which only means something for a
process of its own: an in-process gateway would share them with the test runner.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from conftest import clean_environ

from runtime import proctable
from runtime.settings import CODE_DIR

START_DEADLINE = 60.0  # seconds; generous, the machine is shared
STOP_DEADLINE = 60.0


@dataclass
class GatewayProcess:
    """One running gateway: its process, its URL and its log file."""

    process: subprocess.Popen
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def fd_count(self) -> int:
        """Open file descriptors of the gateway process right now."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_kb(self) -> int:
        """Resident memory of the gateway process right now, in kB."""
        return int(proctable.status_value(self.pid, "VmRSS").split()[0])

    def stop(self) -> int:
        """SIGTERM, as the console stops it (drain, then flush the request log)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def gateway_environment(settings: dict[str, str]) -> dict[str, str]:
    """The environment the console would hand the gateway, with `settings` on top."""
    return {**clean_environ(), "PYTHONPATH": str(CODE_DIR), "PYTHONUNBUFFERED": "1", **settings}


async def start_gateway_process(settings: dict[str, str], log_path: Path) -> GatewayProcess:
    """Start `python -m proxy` with these settings; return once /healthz answers."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy"],
            cwd=CODE_DIR,
            env=gateway_environment(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{settings['LLAMA_PROXY_HOST']}:{settings['LLAMA_PROXY_PORT']}"
    gateway = GatewayProcess(process, url, log_path)
    try:
        await wait_healthy(gateway)
    except BaseException:
        gateway.stop()
        raise
    return gateway


async def wait_healthy(gateway: GatewayProcess) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_DEADLINE
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            if gateway.process.poll() is not None:
                raise AssertionError(f"the gateway exited: {gateway.log_path.read_text()}")
            try:
                async with session.get(f"{gateway.url}/healthz") as probe:
                    if probe.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"the gateway did not answer /healthz within {START_DEADLINE}s")
