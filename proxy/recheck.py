"""The HTTP edge of revocation: re-check a key when its turn comes, end an answer mid-way.

A request is authenticated once, on arrival; it may then wait in the queue for minutes.
When its turn is granted, its key is checked again, but only if the auth cache changed
since (a notification emptied it): the usual turn costs one integer comparison, and a
changed one a cache lookup, or one database lookup shared by all who ask after the change.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

from aiohttp import web

from proxy import appkeys
from proxy.auth import Identity, refusal
from proxy.errors import INVALID_REQUEST, error_body, unauthorized
from proxy.inflight import InFlight
from proxy.requestlog import RequestRecord

REFUSED = 401


async def recheck_at_grant(request: web.Request, identity: Identity, entry: InFlight) -> None:
    """Refuse (401) a request whose key or user died while it waited for its turn."""
    authenticator = request.app[appkeys.AUTHENTICATOR]
    if entry.end_reason is None and authenticator.cache.generation != request.get(
        appkeys.AUTH_GENERATION
    ):
        refused = refusal(await authenticator.lookup(identity.digest), datetime.now(UTC))
        if refused is not None:
            reason, message = refused
            if reason == "unknown_key":  # it was valid on arrival
                reason, message = "key_deleted", f"API key {identity.key_id} was deleted"
            entry.end_reason, entry.end_message = reason, message
    if entry.end_reason is not None:
        raise unauthorized(f"{entry.refusal}; refused when its turn in the queue came")


async def end_in_flight(entry: InFlight, record: RequestRecord) -> web.StreamResponse:
    """The answer to a request ended by revocation: an error event if the stream has
    begun (its status line went out long ago), else a 401."""
    message = f"{entry.refusal}; the answer was cut short"
    response = entry.response
    if response is None or not response.prepared:
        record.status_code = REFUSED
        raise unauthorized(message)
    event = b"data: " + error_body(message, INVALID_REQUEST, "invalid_api_key") + b"\n\n"
    try:
        await response.write(event)
    except RuntimeError:
        return response  # the relay had already ended the answer: it was served whole
    except ConnectionResetError:
        pass  # the client is gone too; the row still says why the answer ended
    record.status_code = REFUSED
    record.error = entry.refusal
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


async def note_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: remember a stream's response, so that it can be ended."""
    entry = request.get(appkeys.INFLIGHT_ENTRY)
    if entry is not None:
        entry.response = response
