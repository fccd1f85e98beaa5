"""What `start --backend-only` tells the operator: how the gateway hosts register this host.

A host that only generates is useful once a gateway host has added its replicas with
`add-backend`, each with this host's LLAMA_API_KEY. The key itself is never printed:
the lines say where it is, so that it travels in a file, never in a shell history.
"""

from __future__ import annotations

import ipaddress
import socket

from runtime.settings import Settings

WILDCARD_HOSTS = ("0.0.0.0", "::")
ADD_BACKEND = "./bin/user_management_cli.sh add-backend"


def is_loopback(host: str) -> bool:
    """True for an address only this host can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    return ipaddress.ip_address(host).is_loopback


def loopback_warning(settings: Settings) -> str | None:
    """A warning when backend-only replicas listen where no other host can reach them."""
    host = settings.server.host
    if not settings.is_backend_only or not is_loopback(host):
        return None
    return (
        f"warning: LLAMA_SERVER_HOST={host} ({settings.source_of('LLAMA_SERVER_HOST')}) is "
        f"loopback: the gateways of other hosts cannot reach these replicas; set it to "
        f"this host's LAN address or 0.0.0.0, then ./console.sh restart"
    )


def reachable_host(listen_host: str, hostname: str | None = None) -> str:
    """The host part of the URL a gateway host should use: this host's name for a wildcard."""
    if listen_host not in WILDCARD_HOSTS:
        return f"[{listen_host}]" if ":" in listen_host else listen_host
    return hostname or socket.gethostname()


def started_lines(settings: Settings, model: str, count: int) -> list[str]:
    """What a backend-only start prints: what serves where, then registration_lines."""
    ports = ", ".join(str(replica.port) for replica in settings.replicas)
    return [
        f"backend only: {count} replica(s) of llama_cpp.server serve {model} on "
        f"{settings.server.host} port {ports} (no database, no gateway on this host)",
        *registration_lines(settings),
    ]


def registration_lines(settings: Settings, hostname: str | None = None) -> list[str]:
    """The commands to run on the gateway host, one add-backend per replica, and the key's place."""
    host = reachable_host(settings.server.host, hostname)
    short = host.split(".")[0].strip("[]").replace(":", "-")
    key_source = settings.source_of("LLAMA_API_KEY")
    where = f"in {key_source}" if key_source.startswith("/") else f"from the {key_source}"
    lines = [
        "on the gateway host, register each replica (FILE holds this host's LLAMA_API_KEY, "
        f"{where}; copy it there into a file of mode 600; it is never printed):"
    ]
    for replica in settings.replicas:
        lines.append(
            f"  {ADD_BACKEND} http://{host}:{replica.port} --name {short}-{replica.name} "
            f"--concurrency 1 --key-file FILE"
        )
    if settings.server.host in WILDCARD_HOSTS:
        lines.append(f"  ({host} is this host's name; use any address the gateway host reaches)")
    return lines
