"""agents.md's worked example of a pool across hosts, as three consoles on one machine.

Host A runs the gateway, the database and one replica; host B runs two replicas with
`start --backend-only`; host C runs a second gateway with LLAMA_SERVER_REPLICAS=0 on A's
database. Each host is a console in its own LLAMAGATE_ROOT, with its own ports and key;
the session's PostgreSQL (a Unix socket) stands in for A's server, which the example
reaches over TCP with a password.

"""

from __future__ import annotations

import os
import re
import secrets
import signal
from pathlib import Path

from conftest import (
    TEST_API_KEY,
    GatewayHome,
    clean_environ,
    free_port,
    link_or_copy,
    processes_matching,
    two_free_ports,
)
from pgfixture import fresh_database

from runtime.settings import FALLBACK_MODEL_NAME

ADD_BACKEND_LINE = re.compile(r"add-backend (http://\S+) --name (\S+) --concurrency 1")
HOST_B_KEY = "host-b-key-" + "b" * 32


def make_host(root: Path, fallback_model: Path, port: int, **env: str) -> GatewayHome:
    """A console in its own LLAMAGATE_ROOT; `proxy_port` is its gateway's, if it runs one."""
    (root / "models").mkdir(parents=True)
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    host = GatewayHome(root=root, port=port, proxy_port=int(env.get("LLAMA_PROXY_PORT", 0)))
    host.env = {
        **clean_environ(),
        "LLAMAGATE_ROOT": str(root),
        "LLAMA_SERVER_PORT": str(port),
        "LLAMA_STOP_GRACE_SECONDS": "5",
        **env,
    }
    return host


def register_backends(host_a: GatewayHome, printed: str, key_file: Path) -> list[str]:
    """Run on A each add-backend line that B printed, FILE being B's key; their names."""
    lines = ADD_BACKEND_LINE.findall(printed)
    assert len(lines) == 2, printed
    for url, name in lines:
        added = host_a.admin(
            "add-backend", url, "--name", name, "--concurrency", "1", "--key-file", str(key_file)
        )
        assert added.returncode == 0, added.stdout + added.stderr
    return [name for _, name in lines]


def test_the_worked_example_serves_through_both_gateways_with_host_bs_replicas(
    tmp_path, fallback_model, pg_cluster
):
    secret = secrets.token_urlsafe(32)  # LLAMA_PROXY_BACKEND_SECRET, the same on A and C
    with fresh_database(pg_cluster) as dsn:
        gateway_env = {
            "LLAMA_PROXY_HOST": "127.0.0.1",
            "LLAMA_PROXY_RATE_LIMIT": "1000",
            "LLAMA_PROXY_BACKEND_SECRET": secret,
            "POSTGRES_AUTH_DSN": dsn,
        }
        host_b = make_host(
            tmp_path / "b",
            fallback_model,
            two_free_ports(),
            LLAMA_API_KEY=HOST_B_KEY,
            LLAMA_SERVER_REPLICAS="2",
            LLAMA_SERVER_HOST="127.0.0.1",  # one machine: B's "LAN address" is loopback
        )
        host_a = make_host(
            tmp_path / "a",
            fallback_model,
            free_port(),
            LLAMA_API_KEY=TEST_API_KEY,
            LLAMA_PROXY_PORT=str(free_port()),
            **gateway_env,
        )
        host_c = make_host(
            tmp_path / "c",
            fallback_model,
            free_port(),
            LLAMA_SERVER_REPLICAS="0",
            LLAMA_PROXY_PORT=str(free_port()),
            **gateway_env,
        )
        hosts = (host_c, host_a, host_b)
        try:
            started_b = host_b.run("start", "--backend-only")
            assert started_b.returncode == 0, started_b.stdout + started_b.stderr
            assert HOST_B_KEY not in started_b.stdout + started_b.stderr
            started_a = host_a.run("start")
            assert started_a.returncode == 0, started_a.stdout + started_a.stderr
            key_file = tmp_path / "hostb.key"
            key_file.write_text(HOST_B_KEY + "\n")
            key_file.chmod(0o600)
            names = register_backends(host_a, started_b.stdout, key_file)
            started_c = host_c.run("start")
            assert started_c.returncode == 0, started_c.stdout + started_c.stderr
            assert "no backend" in started_c.stdout
            assert not processes_matching("llama_cpp.server", str(host_c.root))
            user_key = host_a.new_user("alice", rate_limit=1000)
            for gateway in (host_a, host_c):
                answer = gateway.client(user_key).completions.create(
                    model="any", prompt="Hello", max_tokens=4
                )
                assert answer.choices[0].text is not None
            listed = host_c.admin("list-backends")
            assert listed.returncode == 0, listed.stdout + listed.stderr
            assert all(name in listed.stdout for name in names)
            status_c = host_c.run("status")
            assert status_c.returncode == 0 and "gateway only" in status_c.stdout
        finally:
            for host in hosts:
                host.run("stop", timeout=120)
            for pid in processes_matching("llama_cpp.server", f"--port {host_b.port}"):
                os.kill(pid, signal.SIGKILL)
