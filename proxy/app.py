"""The gateway application: `make_app(config)` wires resources, middleware and routes.

Resources (database pool, request log, auth, rate and token limiters, the one LISTEN
connection, backend session) come from cleanup contexts, so each is closed if and only if
it was opened. Handlers live in proxy/handlers.py (the forwarded routes), proxy/health.py
(/healthz, /readyz, /metrics) and proxy/me.py; this module only assembles.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from aiohttp import web

from proxy import appkeys, handlers, health, store, tokenstore
from proxy.auth import AuthCache, Authenticator, change_subscription
from proxy.authlimit import AuthFailureLimiter
from proxy.chargebacklog import ChargeBacklog
from proxy.chargespool import ChargeSpool, charge_spool_path
from proxy.chattemplate import ChatTemplate, TemplateError, read_chat_template
from proxy.config import ProxyConfig
from proxy.deadlines import Deadlines
from proxy.dispatch import Dispatcher
from proxy.forward import JSON_ROUTES, MODELS_ROUTE, Forwarder
from proxy.inflight import InFlightRequests
from proxy.listener import listen_forever
from proxy.me import me
from proxy.metrics import Metrics
from proxy.modelcheck import ModelCheck
from proxy.pool import BackendPool
from proxy.probe import BackendProber
from proxy.queue import FairQueue
from proxy.ratelimit import SharedLimiter
from proxy.readiness import ReadinessCache
from proxy.recheck import note_response
from proxy.registry import Registry
from proxy.requestlog import RequestLog
from proxy.revocation import RevocationWatch
from proxy.sharedslots import SharedSlots
from proxy.spool import Spool
from proxy.tokenlimit import TokenLimiter
from proxy.tokenwatch import charge_subscription
from proxy.usercache import UserFiguresCache

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 2.0  # the request log's "is the database back?" query
# The shared slots' leases: a take per waiting turn, give-backs, the heartbeat.
LEASE_POOL_SIZE = 4
LEASE_SESSION_SETTINGS = {"synchronous_commit": "off"}


def make_app(config: ProxyConfig) -> web.Application:
    """The gateway for a loaded config; nothing is opened until the app starts."""
    app = web.Application(
        middlewares=[handlers.observe_request], client_max_size=config.max_body_bytes
    )
    app[appkeys.CONFIG] = config
    app[appkeys.MODELS_CACHE] = {}
    app[appkeys.ME_CACHE] = UserFiguresCache(config.me_cache_seconds)
    backends = app[appkeys.BACKENDS] = BackendPool(
        config.backend_urls,
        config.backend_concurrency,
        key=config.backend_key,
        wait_seconds=config.queue_timeout_seconds,
    )
    # With no backend at all, one turn at a time goes on to be told so (503 no_backend).
    queue = FairQueue(
        max(1, backends.capacity),
        config.queue_max_per_user,
        config.queue_max_total,
        config.queue_timeout_seconds,
    )
    app[appkeys.QUEUE] = queue
    backends.on_capacity = lambda capacity: queue.set_capacity(max(1, capacity))
    app[appkeys.METRICS] = Metrics(queue.stats, lambda: backends.backends)
    app[appkeys.INFLIGHT] = InFlightRequests()
    app[appkeys.AUTH_FAILURES] = AuthFailureLimiter(config.auth_failures_per_minute)
    app[appkeys.READINESS] = ReadinessCache(lambda: health.check_readiness(app))
    app.cleanup_ctx.extend(
        [
            database,
            request_log,
            auth,
            rate_limiter,
            token_limiter,
            shared_backends,
            listener,
            backend_session,
        ]
    )
    app.on_response_prepare.append(handlers.add_gateway_headers)
    app.on_response_prepare.append(note_response)
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    for route in JSON_ROUTES:
        app.router.add_post(route, handlers.forward_json)
    # GET only: a HEAD answer has no body, and cached it would empty every GET after it.
    # llama_cpp.server answers HEAD with 405 too, so nothing is lost.
    app.router.add_get(MODELS_ROUTE, handlers.list_models, allow_head=False)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    app.router.add_get("/v1/me", me)


async def database(app: web.Application) -> AsyncIterator[None]:
    config = app[appkeys.CONFIG]
    pool = await store.create_pool(
        config.dsn,
        command_timeout=config.db_command_timeout_seconds,
        acquire_timeout=config.db_acquire_timeout_seconds,
    )
    app[appkeys.POOL] = pool
    yield
    await pool.close()


async def request_log(app: web.Application) -> AsyncIterator[None]:
    pool, config = app[appkeys.POOL], app[appkeys.CONFIG]
    journal = RequestLog(
        lambda rows: store.insert_requests(pool, rows),
        Spool(config.spool_path, config.spool_max_bytes),
        probe=lambda: pool.fetchval("SELECT 1", timeout=PROBE_TIMEOUT_SECONDS),
        on_dropped=app[appkeys.METRICS].log_rows_dropped.inc,
    )
    app[appkeys.REQUEST_LOG] = journal
    flusher = asyncio.create_task(journal.run())
    yield
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    await journal.close()


async def auth(app: web.Application) -> AsyncIterator[None]:
    config, pool = app[appkeys.CONFIG], app[appkeys.POOL]
    cache = AuthCache()
    app[appkeys.AUTHENTICATOR] = Authenticator(pool, cache, config.auth_outage_grace_seconds)
    watch = RevocationWatch(pool, app[appkeys.INFLIGHT])
    app[appkeys.AUTH_SUBSCRIPTION] = change_subscription(cache, watch.changed)
    yield
    await watch.close()


async def rate_limiter(app: web.Application) -> AsyncIterator[None]:
    pool = app[appkeys.POOL]
    limiter = SharedLimiter(
        lambda *batch: store.take_rate_slots(pool, *batch), app[appkeys.CONFIG].rate_window_seconds
    )
    app[appkeys.LIMITER] = limiter
    yield
    # Before the pool closes: a round trip still in flight would hold a connection.
    await limiter.close()


async def token_limiter(app: web.Application) -> AsyncIterator[None]:
    pool, config = app[appkeys.POOL], app[appkeys.CONFIG]
    limiter = TokenLimiter(lambda *batch: tokenstore.charge_tokens(pool, *batch))
    # Charges the database does not take wait on disk, beside the request log's spool.
    limiter.backlog = ChargeBacklog(
        ChargeSpool(charge_spool_path(config.spool_path), config.spool_max_bytes),
        lambda batches: tokenstore.replay_charges(
            pool, batches, limiter.WINDOW, limiter.gateway_id
        ),
        lambda batch_ids: tokenstore.forget_replays(pool, batch_ids),
        on_parked=app[appkeys.METRICS].charge_batches_parked.inc,
        on_replayed=app[appkeys.METRICS].charge_batches_replayed.inc,
    )
    app[appkeys.TOKEN_LIMITER] = limiter
    app[appkeys.TOKEN_SUBSCRIPTION] = charge_subscription(limiter)
    flusher = asyncio.create_task(limiter.run())
    yield
    flusher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await flusher
    # Before the pool closes: the charges not yet written.
    await limiter.close()


async def shared_backends(app: web.Application) -> AsyncIterator[None]:
    """The shared members (proxy/registry.py) and this gateway's leases on their slots.

    The leases go through a small pool of their own whose commits do not wait for the
    disk (LEASE_SESSION_SETTINGS): a take is on every shared request's path. What a
    database crash can lose of them is restored by the heartbeat (proxy/sharedslots.py).
    The registry and everything else stay on the synchronous pool.
    """
    config, pool, backends = app[appkeys.CONFIG], app[appkeys.POOL], app[appkeys.BACKENDS]
    lease_pool = await store.create_pool(
        config.dsn,
        max_size=LEASE_POOL_SIZE,
        command_timeout=config.db_command_timeout_seconds,
        acquire_timeout=config.db_acquire_timeout_seconds,
        server_settings=LEASE_SESSION_SETTINGS,
    )
    slots = app[appkeys.SHARED_SLOTS] = SharedSlots(lease_pool)
    backends.share_through(slots)
    registry = app[appkeys.REGISTRY] = Registry(
        pool, config.backend_secret, backends.update_members
    )
    await slots.start()
    await registry.reload()
    yield
    await registry.close()
    # After the requests have drained: every slot still held goes back, at once.
    await slots.stop()
    await lease_pool.close()


async def listener(app: web.Application) -> AsyncIterator[None]:
    """One LISTEN connection for the gateway: auth's channel, the token limiter's, the
    registry's and the shared slots'.

    Cancelled before their owners close (cleanup runs in reverse), so no notification
    reaches an owner that has shut down.
    """
    subscriptions = [
        app[appkeys.AUTH_SUBSCRIPTION],
        app[appkeys.TOKEN_SUBSCRIPTION],
        app[appkeys.REGISTRY].subscription(),
        app[appkeys.SHARED_SLOTS].subscription(),
    ]
    task = asyncio.create_task(listen_forever(app[appkeys.CONFIG].dsn, subscriptions))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def backend_session(app: web.Application) -> AsyncIterator[None]:
    config = app[appkeys.CONFIG]
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=5, sock_read=config.upstream_timeout_seconds
    )
    # auto_decompress off: bytes are relayed as they come, never re-encoded.
    session = aiohttp.ClientSession(
        timeout=timeout,
        # Below uvicorn's 5 s keep-alive, so a pooled connection is dropped here first.
        connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
        auto_decompress=False,
    )
    dispatcher = Dispatcher(
        session,
        app[appkeys.BACKENDS],
        config.backend_wait_seconds,
        config.restart_flag,
        on_restart_wait=app[appkeys.METRICS].backend_waits.inc,
        restart_flag_max_age=config.restart_flag_max_age_seconds,
        model_check=ModelCheck(session, app[appkeys.POOL], config.model_name),
    )
    app[appkeys.FORWARDER] = Forwarder(
        dispatcher,
        config.backend_key,
        deadlines=Deadlines(config.client_timeout_seconds, config.request_max_seconds),
        chat_template=await load_chat_template(config.model_path),
    )
    prober = app[appkeys.PROBER] = BackendProber(
        session, app[appkeys.BACKENDS], config.backend_probe_timeout_seconds
    )
    await prober.start()
    yield
    await prober.stop()
    dispatcher.close()
    await session.close()


async def load_chat_template(path: Path | None) -> ChatTemplate | None:
    """The model's chat template (read off the event loop), or None: chat streams then
    get no prompt count, which is logged once here rather than on every stream."""
    if path is None:
        return None
    try:
        template = await asyncio.to_thread(read_chat_template, path)
    except TemplateError as error:
        log.warning("%s; chat streams will be logged without prompt tokens", error)
        return None
    if template is None:
        log.warning(
            "%s has no chat template; chat streams will be logged without prompt tokens", path
        )
    return template
