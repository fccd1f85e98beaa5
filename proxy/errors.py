"""OpenAI-shaped error answers, so that every client library shows the message."""

from __future__ import annotations

import json
import math

from aiohttp import web

INVALID_REQUEST = "invalid_request_error"


class GatewayError(Exception):
    """A request the gateway answers itself with an error; raised by any layer."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str = INVALID_REQUEST,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.code = code
        self.retry_after = retry_after
        self.headers = headers or {}


def error_body(message: str, error_type: str, code: str | None) -> bytes:
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


def error_response(error: GatewayError) -> web.Response:
    headers = dict(error.headers)
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return web.Response(
        status=error.status,
        body=error_body(error.message, error.error_type, error.code),
        content_type="application/json",
        headers=headers,
    )


def unauthorized(message: str) -> GatewayError:
    return GatewayError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def not_found(path: str) -> GatewayError:
    shown = path if len(path) <= 100 else path[:100] + "..."
    return GatewayError(404, f"no route {shown!r} on this gateway", code="not_found")


def bad_gateway(message: str) -> GatewayError:
    return GatewayError(502, message, error_type="server_error", code="backend_unavailable")


def unavailable(message: str, retry_after: float, code: str = "unavailable") -> GatewayError:
    return GatewayError(503, message, error_type="server_error", code=code, retry_after=retry_after)
