"""Typed keys for what the gateway keeps on its aiohttp Application and requests."""

from __future__ import annotations

from aiohttp import web

from proxy.auth import Authenticator
from proxy.config import ProxyConfig
from proxy.forward import Forwarder
from proxy.metrics import Metrics
from proxy.queue import FairQueue
from proxy.ratelimit import Decision, SharedLimiter
from proxy.requestlog import RequestLog, RequestRecord
from proxy.store import TimedPool

CONFIG = web.AppKey("config", ProxyConfig)
POOL = web.AppKey("pool", TimedPool)
QUEUE = web.AppKey("queue", FairQueue)
METRICS = web.AppKey("metrics", Metrics)
REQUEST_LOG = web.AppKey("request_log", RequestLog)
AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
LIMITER = web.AppKey("limiter", SharedLimiter)
FORWARDER = web.AppKey("forwarder", Forwarder)
MODELS_CACHE = web.AppKey("models_cache", dict)

RECORD = web.RequestKey("record", RequestRecord)
DECISION = web.RequestKey("decision", Decision)
