"""Token limits at the HTTP edge: the check before admission, the charge after the answer,
and the X-RateLimit-*-Tokens headers. The logic lives in proxy/tokenlimit.py."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from aiohttp import web

from proxy import appkeys
from proxy.auth import Identity
from proxy.errors import GatewayError
from proxy.requestlog import RequestRecord
from proxy.tokenbudget import (
    MINUTE,
    TokenLimits,
    format_reset,
    pick_limits,
)

CHARGE_WAIT_SECONDS = 1.0

# The routes whose answers cost tokens; tokenize and /v1/models are never refused.
TOKEN_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


def limits_of(app: web.Application, identity: Identity) -> TokenLimits:
    """The user's token budgets: their own settings, else the gateway's defaults."""
    config = app[appkeys.CONFIG]
    defaults = (config.tokens_per_minute, config.daily_token_quota, config.monthly_token_quota)
    return pick_limits(identity.token_limits, defaults)


async def enforce_token_limits(request: web.Request, identity: Identity) -> None:
    """Refuse with 429 a user whose token budget is spent; note the headers' figures."""
    if request.path not in TOKEN_ROUTES:
        return
    limits = limits_of(request.app, identity)
    decision = await request.app[appkeys.TOKEN_LIMITER].admit(identity.username, limits)
    if decision is None:
        return
    request[appkeys.TOKEN_LIMITS] = limits
    request[appkeys.TOKEN_DECISION] = decision
    if not decision.is_allowed:
        budget = decision.budget
        raise GatewayError(
            429,
            f"{budget.name} reached: {budget.used} of {budget.limit} tokens used; "
            f"retry after {decision.retry_after:.1f}s",
            "rate_limit_exceeded",
            budget.code,
            retry_after=decision.retry_after,
        )


def tokens_of(record: RequestRecord) -> int:
    """What a request costs: prompt plus completion tokens, an unknown count as 0."""
    return (record.prompt_tokens or 0) + (record.completion_tokens or 0)


async def charge_tokens(request: web.Request, record: RequestRecord) -> None:
    """Charge the answer's tokens; wait for the write when another gateway may look next.

    Called before a whole answer is released (its headers then show this charge), and
    after a stream has ended.
    """
    if record.username is None or not tokens_of(record):
        return
    limiter = request.app[appkeys.TOKEN_LIMITER]
    request[appkeys.TOKENS_CHARGED] = True
    written = limiter.charge(record.username, tokens_of(record))
    if written is not None:
        # A stalled database must not hold the answer for its whole command timeout:
        # past this, the charge is written when it can be, and the answer goes.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(written), CHARGE_WAIT_SECONDS)
    limits = request.get(appkeys.TOKEN_LIMITS)
    if limits is not None:
        decision = limiter.snapshot(record.username, limits)
        if decision is not None:
            request[appkeys.TOKEN_DECISION] = decision


def charge_tokens_nowait(request: web.Request, record: RequestRecord) -> None:
    """Charge a request cut off by its client: nobody waits for it any more."""
    if request.get(appkeys.TOKENS_CHARGED) or record.username is None:
        return
    if tokens_of(record):
        request.app[appkeys.TOKEN_LIMITER].charge(record.username, tokens_of(record))


def add_token_headers(request: web.Request, response: web.StreamResponse) -> None:
    decision = request.get(appkeys.TOKEN_DECISION)
    if decision is not None:
        response.headers.update(decision.headers)


async def token_figures(app: web.Application, identity: Identity) -> dict[str, dict]:
    """For /v1/me: each token budget's limit (None: unlimited), use, and when it resets."""
    limits = limits_of(app, identity)
    limiter = app[appkeys.TOKEN_LIMITER]
    view = await limiter.read(identity.username)
    now = limiter.clock()
    view.roll(now)
    minute_used = view.minute_used(now)
    minute_reset = view.charges[-1][0] + MINUTE - now if view.charges else 0.0
    return {
        "per_minute": _figure(limits.per_minute, minute_used)
        | {"resets_in": format_reset(minute_reset)},
        "daily": _figure(limits.daily, view.day_used) | {"resets_at": _iso(view.day_ends)},
        "monthly": _figure(limits.monthly, view.month_used) | {"resets_at": _iso(view.month_ends)},
    }


def _figure(limit: int, used: int) -> dict[str, int | None]:
    remaining = max(limit - used, 0) if limit else None
    return {"limit": limit or None, "used": used, "remaining": remaining}


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")
