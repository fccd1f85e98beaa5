"""Every configuration key, declared once: its name, type, default and one line of help.

Each section is a frozen dataclass whose fields are the keys, so that code reads a value
as a typed attribute (`settings.gateway.port`) while the loaders, config.env, info and
the docs tests walk the same fields generically. It lives in proxy/ because the gateway
runs on its own and must not import the console; the console imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from proxy.configparse import (
    parse_args,
    parse_device_list,
    parse_dsn,
    parse_flag,
    parse_host,
    parse_non_negative_float,
    parse_non_negative_int,
    parse_optional_int,
    parse_optional_port,
    parse_port,
    parse_positive_float,
    parse_positive_int,
    parse_text,
)

FALLBACK_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
KEY = "key"  # the metadata entry of a field that is a configuration key
T = TypeVar("T")


@dataclass(frozen=True)
class Key:
    """One configuration key: its default text, how to parse it, and its comment in config.env."""

    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    section: str = ""
    is_secret: bool = False  # never shown: info hides it, errors leave its value out

    def described(self, raw: str) -> str:
        """KEY='value' for an error message, or only KEY for a secret."""
        if self.is_secret:
            return f"{self.name} (its value is not shown: it may hold a password)"
        return f"{self.name}={raw!r}"


def setting(
    name: str, default: str, parse: Callable[[str], Any], help: str, is_secret: bool = False
) -> Any:
    """A dataclass field for one key; its default is the parsed default text."""
    key = Key(name, default, parse, help, is_secret=is_secret)
    return field(default=parse(default), metadata={KEY: key})


def key_fields(section: type) -> Iterator[tuple[Field[Any], Key]]:
    """The fields of a section (or of a class built on one) that are keys, with their Key."""
    title = getattr(section, "TITLE", "")
    for item in fields(section):
        if KEY in item.metadata:
            yield item, Key(**{**vars(item.metadata[KEY]), "section": title})


def keys_of(section: type) -> tuple[Key, ...]:
    return tuple(key for _, key in key_fields(section))


def build(section: type[T], parsed: Mapping[str, Any], **others: Any) -> T:
    """An instance of section from values parsed by key name (plus fields that are no keys)."""
    values = {item.name: parsed[key.name] for item, key in key_fields(section)}
    return section(**values, **others)


def values_of(instance: Any) -> dict[str, Any]:
    """A section's values by key name, for code that walks the keys generically."""
    return {key.name: getattr(instance, item.name) for item, key in key_fields(type(instance))}


@dataclass(frozen=True)
class ServerKeys:
    """The model and llama_cpp.server, the backend."""

    TITLE: ClassVar[str] = "Model and backend"

    model: str = setting(
        "LLAMA_MODEL",
        FALLBACK_MODEL_NAME,
        parse_text,
        "GGUF file to serve: a path, or a file name in models/ (see ./console.sh models)",
    )
    model_alias: str = setting(
        "LLAMA_MODEL_ALIAS",
        "",
        parse_text,
        "name clients see for the model in /v1/models and answers (empty: its file name)",
    )
    host: str = setting(
        "LLAMA_SERVER_HOST",
        "127.0.0.1",
        parse_host,
        "address llama_cpp.server listens on in single-key mode and with start --backend-only "
        "(gateway mode: 127.0.0.1)",
    )
    port: int = setting(
        "LLAMA_SERVER_PORT",
        "8000",
        parse_port,
        "port llama_cpp.server listens on; replica i listens on this port + i (the "
        "gateway's port is skipped)",
    )
    replicas: int = setting(
        "LLAMA_SERVER_REPLICAS",
        "1",
        parse_non_negative_int,
        "llama_cpp.server processes of the model to run on this host, behind the gateway "
        "(each generates for one request at a time); 0: none, a gateway-only host whose "
        "backends are added with add-backend",
    )
    replica_gpus: tuple[str, ...] = setting(
        "LLAMA_REPLICA_GPUS",
        "",
        parse_device_list,
        "one GPU per replica, as CUDA_VISIBLE_DEVICES ids, e.g. 0,1 (empty: every replica "
        "sees the GPUs of the environment)",
    )
    api_key: str = setting(
        "LLAMA_API_KEY",
        "",
        parse_text,
        "the backend's bearer key (generated): clients send it in single-key mode; in "
        "gateway mode only the gateway does",
        is_secret=True,
    )
    n_ctx: int | None = setting(
        "LLAMA_N_CTX",
        "",
        parse_optional_int,
        "context window in tokens (empty: llama_cpp.server's default, 2048)",
    )
    n_threads: int | None = setting(
        "LLAMA_N_THREADS",
        "",
        parse_optional_int,
        "CPU threads for generation, per replica (empty: the cores this host gives the "
        "console, divided by LLAMA_SERVER_REPLICAS, at least 1)",
    )
    n_gpu_layers: int | None = setting(
        "LLAMA_N_GPU_LAYERS",
        "",
        parse_optional_int,
        "layers to offload to the GPU, -1 for all (needs a GPU build)",
    )
    extra_args: tuple[str, ...] = setting(
        "LLAMA_EXTRA_ARGS",
        "",
        parse_args,
        "further llama_cpp.server flags, shell-quoted, e.g. --n_batch 256",
    )


@dataclass(frozen=True)
class ConsoleKeys:
    """How the console supervises its processes."""

    TITLE: ClassVar[str] = "Console and supervision"

    start_timeout_seconds: float = setting(
        "LLAMA_START_TIMEOUT_SECONDS",
        "120",
        parse_positive_float,
        "how long start waits for the backend to answer before giving up",
    )
    stop_grace_seconds: float = setting(
        "LLAMA_STOP_GRACE_SECONDS",
        "10",
        parse_positive_float,
        "how long stop waits after SIGTERM before it sends SIGKILL",
    )
    log_max_bytes: int = setting(
        "LLAMA_LOG_MAX_BYTES",
        "10485760",
        parse_positive_int,
        "size at which runtime/logs/backend.log is rotated",
    )
    log_backups: int = setting(
        "LLAMA_LOG_BACKUPS", "3", parse_positive_int, "rotated log files to keep"
    )
    restart_backoff_seconds: float = setting(
        "LLAMA_RESTART_BACKOFF_SECONDS",
        "1",
        parse_positive_float,
        "foreground mode: first wait before restarting a crashed backend; doubles each time",
    )
    restart_max_crashes: int = setting(
        "LLAMA_RESTART_MAX_CRASHES",
        "5",
        parse_positive_int,
        "foreground mode: give up after this many crashes...",
    )
    restart_window_seconds: float = setting(
        "LLAMA_RESTART_WINDOW_SECONDS",
        "300",
        parse_positive_float,
        "...within this many seconds",
    )


@dataclass(frozen=True)
class GatewayKeys:
    """The gateway in front of the backend; ProxyConfig is built on these fields."""

    TITLE: ClassVar[str] = "Gateway"

    enabled: bool = setting(
        "LLAMA_PROXY_ENABLED",
        "1",
        parse_flag,
        "1: the gateway (per-user keys, limits, queue, request log) in front of a "
        "loopback-only backend; 0: single-key mode, clients call the backend directly",
    )
    host: str = setting("LLAMA_PROXY_HOST", "0.0.0.0", parse_host, "address the gateway listens on")
    port: int = setting("LLAMA_PROXY_PORT", "8001", parse_port, "port the gateway listens on")
    rate_limit: int = setting(
        "LLAMA_PROXY_RATE_LIMIT",
        "60",
        parse_positive_int,
        "requests each user may make per window (a user's own limit overrides it)",
    )
    rate_window_seconds: float = setting(
        "LLAMA_PROXY_RATE_WINDOW_SECONDS",
        "60",
        parse_positive_float,
        "the sliding window of the rate limit, in seconds",
    )
    tokens_per_minute: int = setting(
        "LLAMA_PROXY_TOKENS_PER_MINUTE",
        "0",
        parse_non_negative_int,
        "prompt plus completion tokens each user may use in any 60 seconds (0: unlimited; "
        "set-limit NAME --tpm N overrides it per user)",
    )
    daily_token_quota: int = setting(
        "LLAMA_PROXY_DAILY_TOKEN_QUOTA",
        "0",
        parse_non_negative_int,
        "tokens each user may use per UTC day (0: unlimited; set-quota overrides it per user)",
    )
    monthly_token_quota: int = setting(
        "LLAMA_PROXY_MONTHLY_TOKEN_QUOTA",
        "0",
        parse_non_negative_int,
        "tokens each user may use per UTC calendar month (0: unlimited; set-quota overrides "
        "it per user)",
    )
    max_body_bytes: int = setting(
        "LLAMA_PROXY_MAX_BODY_BYTES",
        "1048576",
        parse_positive_int,
        "largest request body accepted; larger bodies get 413",
    )
    backend_wait_seconds: float = setting(
        "LLAMA_PROXY_BACKEND_WAIT_SECONDS",
        "60",
        parse_positive_float,
        "while the backend restarts, how long a request waits before it gets 503",
    )
    backend_concurrency: int = setting(
        "LLAMA_PROXY_BACKEND_CONCURRENCY",
        "1",
        parse_positive_int,
        "requests sent to each backend at once; the rest wait in the fair queue",
    )
    backend_probe_timeout_seconds: float = setting(
        "LLAMA_PROXY_BACKEND_PROBE_TIMEOUT_SECONDS",
        "5",
        parse_positive_float,
        "a backend that does not answer its health probe (each second) within this many "
        "seconds is taken out of the pool until it does (a hung backend)",
    )
    queue_max_per_user: int = setting(
        "LLAMA_PROXY_QUEUE_MAX_PER_USER",
        "32",
        parse_positive_int,
        "requests one user may have waiting in the queue; more get 429",
    )
    queue_max_total: int = setting(
        "LLAMA_PROXY_QUEUE_MAX_TOTAL",
        "256",
        parse_positive_int,
        "requests that may wait in the queue in all; more get 503",
    )
    queue_timeout_seconds: float = setting(
        "LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS",
        "300",
        parse_positive_float,
        "how long a request may wait in the queue before it gets 503",
    )
    user_concurrency: int = setting(
        "LLAMA_PROXY_USER_CONCURRENCY",
        "0",
        parse_non_negative_int,
        "requests one user may have at the backend at once, per gateway; more wait their "
        "turn in the queue (0: no cap; a user's own cap overrides it)",
    )
    upstream_timeout_seconds: float = setting(
        "LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS",
        "600",
        parse_positive_float,
        "longest silence from the backend during one answer before the gateway gives up (504)",
    )
    client_timeout_seconds: float = setting(
        "LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS",
        "30",
        parse_positive_float,
        "how long a client may take to send a request (a body still arriving after this "
        "gets 408, and a connection without a whole request head by then is closed), and "
        "to take each part of an answer (else the request is cut off and logged 499)",
    )
    request_max_seconds: float = setting(
        "LLAMA_PROXY_REQUEST_MAX_SECONDS",
        "600",
        parse_positive_float,
        "longest one request may hold the backend: a longer answer is cut off (504, or an "
        "error event in a stream)",
    )
    max_tokens: int = setting(
        "LLAMA_PROXY_MAX_TOKENS",
        "4096",
        parse_non_negative_int,
        "ceiling on max_tokens of a completion: more gets 400, none asked for gets this "
        "(0: no ceiling)",
    )
    me_cache_seconds: float = setting(
        "LLAMA_PROXY_ME_CACHE_SECONDS",
        "1",
        parse_positive_float,
        "how long /v1/me answers a user's limits and usage from memory before asking the "
        "database again",
    )
    drain_seconds: float = setting(
        "LLAMA_PROXY_DRAIN_SECONDS",
        "30",
        parse_positive_float,
        "on stop, how long the gateway lets requests in flight finish",
    )
    auth_outage_grace_seconds: float = setting(
        "LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS",
        "30",
        parse_non_negative_float,
        "while PostgreSQL is unreachable, keys known valid within this many seconds keep "
        "working; 0 fails closed (every request gets 503 until the database answers)",
    )
    auth_failures_per_minute: int = setting(
        "LLAMA_PROXY_AUTH_FAILURES_PER_MINUTE",
        "60",
        parse_non_negative_int,
        "refused keys (401) one client address may cause per minute, in a burst or spread "
        "out; past it the address gets 429, except for keys the gateway knows valid (0: off)",
    )
    db_command_timeout_seconds: float = setting(
        "LLAMA_PROXY_DB_COMMAND_TIMEOUT_SECONDS",
        "5",
        parse_positive_float,
        "longest wait for one database query; past it the database counts as unavailable "
        "(cached keys, local rate limits, spooled log rows) instead of hanging requests",
    )
    db_acquire_timeout_seconds: float = setting(
        "LLAMA_PROXY_DB_ACQUIRE_TIMEOUT_SECONDS",
        "5",
        parse_positive_float,
        "longest wait for a free database connection; past it the database counts as unavailable",
    )
    spool_max_mb: int = setting(
        "LLAMA_PROXY_SPOOL_MAX_MB",
        "512",
        parse_positive_int,
        "largest size of the request-log spool file (rows waiting for the database); "
        "rows beyond it are dropped and counted. The token charge spool has the same cap",
    )
    metrics_token: str = setting(
        "LLAMA_PROXY_METRICS_TOKEN",
        "",
        parse_text,
        "bearer token for /metrics (without it, /metrics answers only loopback callers that "
        "forward nobody: no Forwarded, X-Forwarded-For or X-Real-IP header)",
        is_secret=True,
    )
    backend_secret: str = setting(
        "LLAMA_PROXY_BACKEND_SECRET",
        "",
        parse_text,
        "seals the internal keys of backends on other hosts (add-backend) in PostgreSQL; "
        "generated; every gateway and admin host on one database needs the same value",
        is_secret=True,
    )


@dataclass(frozen=True)
class DatabaseKeys:
    """The operator's own PostgreSQL; all empty means the console's private cluster."""

    TITLE: ClassVar[str] = "Database (leave empty to use the private cluster in runtime/pgdata)"

    dsn: str = setting(
        "POSTGRES_AUTH_DSN",
        "",
        parse_dsn,
        "postgresql://user:password@host:port/db",
        is_secret=True,
    )
    host: str = setting("POSTGRES_AUTH_HOST", "", parse_text, "database server host")
    port: int | None = setting(
        "POSTGRES_AUTH_PORT", "", parse_optional_port, "database server port"
    )
    db: str = setting("POSTGRES_AUTH_DB", "", parse_text, "database name")
    user: str = setting("POSTGRES_AUTH_USER", "", parse_text, "database user")
    password: str = setting(
        "POSTGRES_AUTH_PASSWORD", "", parse_text, "database password", is_secret=True
    )


# The operator's keys, in the order of config.env and .env.example.
SECTIONS: tuple[type, ...] = (ServerKeys, ConsoleKeys, GatewayKeys, DatabaseKeys)
KEYS: tuple[Key, ...] = tuple(key for section in SECTIONS for key in keys_of(section))
KEY_NAMES = frozenset(key.name for key in KEYS)
