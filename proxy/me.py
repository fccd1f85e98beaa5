"""GET /v1/me: the caller's own name, limits, remaining allowance and usage.

Clients poll /v1/me (dashboards, `watch curl`), and each answer costs two database
queries, so a user's figures come from a short cache (proxy/usercache.py). The key is
still checked on every call, so a revoked key is refused at once.
"""

from __future__ import annotations

from aiohttp import web

from proxy import appkeys, store
from proxy.auth import Identity
from proxy.errors import unavailable
from proxy.handlers import authenticate, concurrency_cap
from proxy.tokengate import token_figures
from proxy.usercache import UserFigures


async def read_figures(app: web.Application, identity: Identity) -> UserFigures:
    """The user's figures, from the cache or else the database (503 if it is down)."""
    username = identity.username
    cache = app[appkeys.ME_CACHE]
    figures = cache.get(username)
    if figures is not None:
        return figures
    pool, window = app[appkeys.POOL], app[appkeys.CONFIG].rate_window_seconds
    try:
        used = await store.count_rate_slots(pool, username, window)
        usage = await store.user_usage(pool, username, hours=24)
    except store.UNAVAILABLE_ERRORS:
        raise unavailable("the database is unreachable; try again shortly", 5, "db_down") from None
    figures = UserFigures(used, usage, await token_figures(app, identity))
    cache.put(username, figures)
    return figures


async def me(request: web.Request) -> web.Response:
    """GET /v1/me: the caller's own name, limit, remaining allowance and usage."""
    identity = await authenticate(request)
    config = request.app[appkeys.CONFIG]
    limit = identity.rate_limit or config.rate_limit
    figures = await read_figures(request.app, identity)
    return web.json_response(
        {
            "username": identity.username,
            "key_id": identity.key_id,
            "rate_limit": {
                "limit": limit,
                "window_seconds": config.rate_window_seconds,
                "remaining": max(limit - figures.rate_slots_used, 0),
            },
            # Requests at the backend at once, on each gateway; null: no cap.
            "concurrency": {"limit": concurrency_cap(identity, config.user_concurrency) or None},
            "usage_last_24h": figures.usage_last_24h,
            "tokens": figures.tokens,
        }
    )
