"""The gateway's own routes for operators: /healthz, /readyz and /metrics.

They answer about the gateway itself, never forward, and are not in the request log
(handlers.UNLOGGED_PATHS); proxy/app.py routes them.
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy import appkeys, store
from proxy.dispatch import NO_BACKEND
from proxy.errors import GatewayError

FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the gateway process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: a backend serves, the database answers, the request log and the token
    charges can spool."""
    app = request.app
    checks = await app[appkeys.READINESS].get()
    is_ready = all(value == "ok" for value in checks.values())
    queue = app[appkeys.QUEUE].stats()
    backends = app[appkeys.BACKENDS]
    body = {
        "ready": is_ready,
        **checks,
        "backends": {"up": backends.serving(), "total": len(backends.backends)},
        # Members of llama_backends among them, and whether this gateway may lease their
        # slots (false while its heartbeat to the database fails).
        "shared": {"members": len(backends.members), "usable": app[appkeys.SHARED_SLOTS].is_usable},
        "queue": {"active": queue.active, "waiting": queue.waiting},
    }
    return web.json_response(body, status=200 if is_ready else 503)


async def check_readiness(app: web.Application) -> dict[str, str]:
    """The checks behind /readyz, each "ok" or what is wrong (cached by proxy/readiness.py)."""
    return {
        "backend": await _check_backend(app),
        "database": await _check_database(app),
        "request_log": app[appkeys.REQUEST_LOG].problem or "ok",
        "token_charges": _check_token_charges(app),
    }


def _check_token_charges(app: web.Application) -> str:
    """Ok unless the disk refuses the charge spool or it is full (proxy/chargebacklog.py)."""
    backlog = app[appkeys.TOKEN_LIMITER].backlog
    return (backlog.error if backlog is not None else None) or "ok"


async def _check_backend(app: web.Application) -> str:
    """Ok while at least one backend serves; the probes keep the pool's view current."""
    backends = app[appkeys.BACKENDS]
    if backends.serving():
        return "ok"
    if not backends.backends:
        return NO_BACKEND
    state = "restarting" if app[appkeys.FORWARDER].dispatcher.is_restarting() else "unreachable"
    return f"{state} ({backends.backends[0].problem})"


async def _check_database(app: web.Application) -> str:
    try:
        await app[appkeys.POOL].fetchval("SELECT 1", timeout=2)
    except store.UNAVAILABLE_ERRORS as error:
        return f"unreachable ({type(error).__name__})"
    return "ok"


async def metrics(request: web.Request) -> web.Response:
    """Prometheus metrics, for loopback callers or holders of LLAMA_PROXY_METRICS_TOKEN."""
    if not _may_read_metrics(request):
        raise GatewayError(
            403,
            "/metrics answers loopback callers that are not forwarding someone else's request "
            "(no Forwarded, X-Forwarded-For or X-Real-IP header), or 'Authorization: Bearer' "
            "with LLAMA_PROXY_METRICS_TOKEN",
            code="forbidden",
        )
    body = request.app[appkeys.METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _may_read_metrics(request: web.Request) -> bool:
    token = request.app[appkeys.CONFIG].metrics_token
    offered = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    if token and hmac.compare_digest(offered.encode(), token.encode()):
        return True
    if any(header in request.headers for header in FORWARDING_HEADERS):
        # A reverse proxy on this host connects from loopback on behalf of anyone.
        return False
    try:
        return ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        return False
