"""How aiohttp's HTTP server runs the gateway: one set of options for production and tests.

`python -m proxy` passes these to `web.run_app`, and the test fixture to
`TestServer.start_server`, so the tests exercise the server that runs in production.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from aiohttp.web_protocol import RequestPayloadError

from proxy.config import ProxyConfig

# What aiohttp's parser raises when a client sends a malformed request or body.
CLIENT_FAULTS = (HttpProcessingError, RequestPayloadError)


class ClientFaultLogger(logging.LoggerAdapter):
    """aiohttp's server logger, with a malformed request logged as one WARNING line.

    aiohttp logs each request its parser refuses at ERROR with a traceback. That is the
    client's doing, not a fault of the gateway: with a traceback per bad request any
    client could fill the log and bury real errors. The parser's message is left out
    too, because it quotes the offending line, which may be an Authorization header.
    """

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        error = kwargs.get("exc_info")
        if level > logging.WARNING and isinstance(error, CLIENT_FAULTS):
            level, kwargs["exc_info"] = logging.WARNING, None
            msg, args = f"{msg} (%s, the client's fault)", (*args, type(error).__name__)
        super().log(level, msg, *args, **kwargs)


def server_options(config: ProxyConfig) -> dict[str, Any]:
    """Keyword arguments for aiohttp's AppRunner (and through it, its Server)."""
    return {
        # A client that disconnects cancels its handler, which frees its queue place and
        # closes its upstream request (so generation stops), and is logged as 499.
        "handler_cancellation": True,
        # aiohttp arms this timer when a connection opens and after each answer, and bytes
        # arriving do not re-arm it: a client that trickles its request head (slowloris) is
        # disconnected when it runs out. The body has its own deadline (read_body, 408).
        "keepalive_timeout": config.client_timeout_seconds,
        # On SIGTERM, requests in flight get this long before the cleanup contexts run.
        "shutdown_timeout": config.drain_seconds,
        # The request log (proxy/requestlog.py) records every request; no access log.
        "access_log": None,
        "logger": ClientFaultLogger(server_logger, {}),
    }
