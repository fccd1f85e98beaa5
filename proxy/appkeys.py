"""Typed keys for what the gateway keeps on its aiohttp Application and requests."""

from __future__ import annotations

from aiohttp import web

from proxy.auth import Authenticator
from proxy.authlimit import AuthFailureLimiter
from proxy.config import ProxyConfig
from proxy.forward import Forwarder
from proxy.inflight import InFlight, InFlightRequests
from proxy.listener import Subscription
from proxy.metrics import Metrics
from proxy.pool import BackendPool
from proxy.probe import BackendProber
from proxy.queue import FairQueue
from proxy.ratelimit import Decision, SharedLimiter
from proxy.readiness import ReadinessCache
from proxy.registry import Registry
from proxy.requestlog import RequestLog, RequestRecord
from proxy.sharedslots import SharedSlots
from proxy.store import TimedPool
from proxy.tokenbudget import TokenDecision, TokenLimits
from proxy.tokenlimit import TokenLimiter
from proxy.usercache import UserFiguresCache

CONFIG = web.AppKey("config", ProxyConfig)
POOL = web.AppKey("pool", TimedPool)
QUEUE = web.AppKey("queue", FairQueue)
METRICS = web.AppKey("metrics", Metrics)
REQUEST_LOG = web.AppKey("request_log", RequestLog)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
LIMITER = web.AppKey("limiter", SharedLimiter)
FORWARDER = web.AppKey("forwarder", Forwarder)
BACKENDS = web.AppKey("backends", BackendPool)
PROBER = web.AppKey("prober", BackendProber)
REGISTRY = web.AppKey("registry", Registry)  # the shared members, kept fresh
SHARED_SLOTS = web.AppKey("shared_slots", SharedSlots)
MODELS_CACHE = web.AppKey("models_cache", dict)
INFLIGHT = web.AppKey("inflight", InFlightRequests)
AUTH_FAILURES = web.AppKey("auth_failures", AuthFailureLimiter)
READINESS = web.AppKey("readiness", ReadinessCache)
ME_CACHE = web.AppKey("me_cache", UserFiguresCache)
TOKEN_LIMITER = web.AppKey("token_limiter", TokenLimiter)
# What auth and the token limiter each hear on the gateway's one LISTEN connection.
AUTH_SUBSCRIPTION = web.AppKey("auth_subscription", Subscription)
TOKEN_SUBSCRIPTION = web.AppKey("token_subscription", Subscription)

RECORD = web.RequestKey("record", RequestRecord)
DECISION = web.RequestKey("decision", Decision)
INFLIGHT_ENTRY = web.RequestKey("inflight_entry", InFlight)
TOKEN_LIMITS = web.RequestKey("token_limits", TokenLimits)
TOKEN_DECISION = web.RequestKey("token_decision", TokenDecision)
TOKENS_CHARGED = web.RequestKey("tokens_charged", bool)
# The auth cache's generation when the request was authenticated (see proxy/recheck.py).
AUTH_GENERATION = web.RequestKey("auth_generation", int)
