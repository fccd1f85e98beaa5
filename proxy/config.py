"""The gateway's configuration, read from the environment into a frozen ProxyConfig.

This is the only proxy module that reads os.environ. The key definitions live here
because the gateway runs on its own (`python -m proxy`); the console imports them to
document and validate the same keys in runtime/config.env.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit


class ProxyConfigError(Exception):
    """A gateway setting is invalid; the message names the key."""


@dataclass(frozen=True)
class Key:
    """One configuration key: its default, how to parse it, and its comment in config.env."""

    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    section: str


def parse_text(value: str) -> str:
    return value


def parse_whole_number(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("must be a whole number") from None


def parse_optional_int(value: str) -> int | None:
    return None if value == "" else parse_whole_number(value)


def parse_non_negative_int(value: str) -> int:
    number = parse_whole_number(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def parse_positive_int(value: str) -> int:
    number = parse_whole_number(value)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def parse_positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if number <= 0:
        raise ValueError("must be greater than 0")
    return number


def parse_non_negative_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not number >= 0 or number == float("inf"):
        raise ValueError("must be 0 (fail closed) or a finite number of seconds")
    return number


def parse_port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return int(value)


def parse_optional_port(value: str) -> int | None:
    return None if value == "" else parse_port(value)


def parse_host(value: str) -> str:
    if value != "localhost":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("must be an IP address such as 127.0.0.1, or localhost") from None
    return value


def parse_flag(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0")


def parse_dsn(value: str) -> str:
    if value and urlsplit(value).scheme not in ("postgres", "postgresql"):
        raise ValueError("must be a postgresql:// URL")
    return value


GATEWAY = "Gateway"
DATABASE = "Database (leave empty to use the private cluster in runtime/pgdata)"

GATEWAY_KEYS: tuple[Key, ...] = (
    Key(
        "LLAMA_PROXY_ENABLED",
        "1",
        parse_flag,
        "1: the gateway (per-user keys, limits, queue, request log) in front of a "
        "loopback-only backend; 0: single-key mode, clients call the backend directly",
        GATEWAY,
    ),
    Key("LLAMA_PROXY_HOST", "0.0.0.0", parse_host, "address the gateway listens on", GATEWAY),
    Key("LLAMA_PROXY_PORT", "8001", parse_port, "port the gateway listens on", GATEWAY),
    Key(
        "LLAMA_PROXY_RATE_LIMIT",
        "60",
        parse_positive_int,
        "requests each user may make per window (a user's own limit overrides it)",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_RATE_WINDOW_SECONDS",
        "60",
        parse_positive_float,
        "the sliding window of the rate limit, in seconds",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_MAX_BODY_BYTES",
        "1048576",
        parse_positive_int,
        "largest request body accepted; larger bodies get 413",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_BACKEND_WAIT_SECONDS",
        "60",
        parse_positive_float,
        "while the backend restarts, how long a request waits before it gets 503",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_BACKEND_CONCURRENCY",
        "1",
        parse_positive_int,
        "requests sent to the backend at once; the rest wait in the fair queue",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_QUEUE_MAX_PER_USER",
        "32",
        parse_positive_int,
        "requests one user may have waiting in the queue; more get 429",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_QUEUE_MAX_TOTAL",
        "256",
        parse_positive_int,
        "requests that may wait in the queue in all; more get 503",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS",
        "300",
        parse_positive_float,
        "how long a request may wait in the queue before it gets 503",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS",
        "600",
        parse_positive_float,
        "longest silence from the backend during one answer before the gateway gives up (504)",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS",
        "30",
        parse_positive_float,
        "how long a client may take to send a request (a body still arriving after this "
        "gets 408, and a connection without a whole request head by then is closed), and "
        "to take each part of an answer (else the request is cut off and logged 499)",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_REQUEST_MAX_SECONDS",
        "600",
        parse_positive_float,
        "longest one request may hold the backend: a longer answer is cut off (504, or an "
        "error event in a stream)",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_MAX_TOKENS",
        "4096",
        parse_non_negative_int,
        "ceiling on max_tokens of a completion: more gets 400, none asked for gets this "
        "(0: no ceiling)",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_ME_CACHE_SECONDS",
        "1",
        parse_positive_float,
        "how long /v1/me answers a user's limits and usage from memory before asking the "
        "database again",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_DRAIN_SECONDS",
        "30",
        parse_positive_float,
        "on stop, how long the gateway lets requests in flight finish",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS",
        "30",
        parse_non_negative_float,
        "while PostgreSQL is unreachable, keys known valid within this many seconds keep "
        "working; 0 fails closed (every request gets 503 until the database answers)",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_AUTH_FAILURES_PER_MINUTE",
        "60",
        parse_non_negative_int,
        "refused keys (401) one client address may cause per minute, in a burst or spread "
        "out; past it the address gets 429, except for keys the gateway knows valid (0: off)",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_DB_COMMAND_TIMEOUT_SECONDS",
        "5",
        parse_positive_float,
        "longest wait for one database query; past it the database counts as unavailable "
        "(cached keys, local rate limits, spooled log rows) instead of hanging requests",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_DB_ACQUIRE_TIMEOUT_SECONDS",
        "5",
        parse_positive_float,
        "longest wait for a free database connection; past it the database counts as unavailable",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_SPOOL_MAX_MB",
        "512",
        parse_positive_int,
        "largest size of the request-log spool file (rows waiting for the database); "
        "rows beyond it are dropped and counted",
        GATEWAY,
    ),
    Key(
        "LLAMA_PROXY_METRICS_TOKEN",
        "",
        parse_text,
        "bearer token for /metrics (without it, /metrics answers only loopback callers that "
        "forward nobody: no Forwarded, X-Forwarded-For or X-Real-IP header)",
        GATEWAY,
    ),
)

DATABASE_KEYS: tuple[Key, ...] = (
    Key("POSTGRES_AUTH_DSN", "", parse_dsn, "postgresql://user:password@host:port/db", DATABASE),
    Key("POSTGRES_AUTH_HOST", "", parse_text, "database server host", DATABASE),
    Key("POSTGRES_AUTH_PORT", "", parse_optional_port, "database server port", DATABASE),
    Key("POSTGRES_AUTH_DB", "", parse_text, "database name", DATABASE),
    Key("POSTGRES_AUTH_USER", "", parse_text, "database user", DATABASE),
    Key("POSTGRES_AUTH_PASSWORD", "", parse_text, "database password", DATABASE),
)

# Set by the console for the gateway process; not operator settings.
BACKEND_URL_KEY = "LLAMA_PROXY_BACKEND_URL"
BACKEND_KEY_KEY = "LLAMA_API_KEY"
SPOOL_KEY = "LLAMA_PROXY_SPOOL_PATH"
RESTART_FLAG_KEY = "LLAMA_PROXY_RESTART_FLAG"
RESTART_FLAG_MAX_AGE_KEY = "LLAMA_PROXY_RESTART_FLAG_MAX_AGE"
# Without the console's figure: its default start timeout (120 s), stop grace (10 s), the
# SIGKILL wait (5 s) and a margin. A console killed mid-restart leaves its flag behind.
DEFAULT_RESTART_FLAG_MAX_AGE_SECONDS = 165.0
# The name clients see for the model (its alias), filled into requests that name none.
MODEL_NAME_KEY = "LLAMA_PROXY_MODEL_NAME"


@dataclass(frozen=True)
class ProxyConfig:
    """Everything the gateway needs, parsed and validated."""

    host: str
    port: int
    backend_url: str
    backend_key: str
    dsn: str
    spool_path: Path
    restart_flag: Path | None
    rate_limit: int
    rate_window_seconds: float
    max_body_bytes: int
    backend_wait_seconds: float
    backend_concurrency: int
    queue_max_per_user: int
    queue_max_total: int
    queue_timeout_seconds: float
    upstream_timeout_seconds: float
    drain_seconds: float
    auth_outage_grace_seconds: float
    metrics_token: str
    client_timeout_seconds: float = 30.0
    restart_flag_max_age_seconds: float = DEFAULT_RESTART_FLAG_MAX_AGE_SECONDS
    auth_failures_per_minute: int = 60
    request_max_seconds: float = 600.0
    max_tokens: int = 4096
    me_cache_seconds: float = 1.0
    # The model's alias, for requests that name no model ("": leave them as they are).
    model_name: str = ""
    db_command_timeout_seconds: float = 5.0
    db_acquire_timeout_seconds: float = 5.0
    spool_max_mb: int = 512

    @property
    def spool_max_bytes(self) -> int:
        return self.spool_max_mb * 1024 * 1024


def parse_key(key: Key, raw: str, source: str = "the environment") -> Any:
    """Parse one value; a ValueError becomes a ProxyConfigError naming the key."""
    try:
        return key.parse(raw.strip())
    except ValueError as error:
        raise ProxyConfigError(f"invalid {key.name}={raw!r} from {source}: {error}") from None


def database_dsn(values: Mapping[str, Any]) -> str:
    """POSTGRES_AUTH_DSN, or a DSN built from the POSTGRES_AUTH_* parts; '' if none is set."""
    if values.get("POSTGRES_AUTH_DSN"):
        return values["POSTGRES_AUTH_DSN"]
    if not values.get("POSTGRES_AUTH_HOST"):
        return ""
    user = quote(values.get("POSTGRES_AUTH_USER") or "", safe="")
    password = quote(values.get("POSTGRES_AUTH_PASSWORD") or "", safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    port = f":{values['POSTGRES_AUTH_PORT']}" if values.get("POSTGRES_AUTH_PORT") else ""
    database = quote(values.get("POSTGRES_AUTH_DB") or "", safe="")
    return f"postgresql://{credentials}{values['POSTGRES_AUTH_HOST']}{port}/{database}"


def redact_dsn(dsn: str) -> str:
    """The DSN with its password (in the user part or the query) replaced, for errors and logs."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = "&".join(
        f"{name}=***" if name.lower() == "password" else f"{name}={value}" if sep else name
        for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def load_config(environ: Mapping[str, str] | None = None) -> ProxyConfig:
    """Read and validate the gateway's settings; raise ProxyConfigError."""
    environ = os.environ if environ is None else environ
    values = {
        key.name: parse_key(key, environ.get(key.name, key.default))
        for key in GATEWAY_KEYS + DATABASE_KEYS
    }
    dsn = database_dsn(values)
    if not dsn:
        raise ProxyConfigError(
            "no database: set POSTGRES_AUTH_DSN (or POSTGRES_AUTH_HOST and friends); "
            "./console.sh start sets it for the private cluster"
        )
    backend_url = environ.get(BACKEND_URL_KEY, "http://127.0.0.1:8000").rstrip("/")
    flag = environ.get(RESTART_FLAG_KEY, "")
    return ProxyConfig(
        host=values["LLAMA_PROXY_HOST"],
        port=values["LLAMA_PROXY_PORT"],
        backend_url=backend_url,
        backend_key=environ.get(BACKEND_KEY_KEY, ""),
        dsn=dsn,
        spool_path=Path(environ.get(SPOOL_KEY, "llama_requests.spool")),
        restart_flag=Path(flag) if flag else None,
        restart_flag_max_age_seconds=_restart_flag_max_age(environ),
        rate_limit=values["LLAMA_PROXY_RATE_LIMIT"],
        rate_window_seconds=values["LLAMA_PROXY_RATE_WINDOW_SECONDS"],
        max_body_bytes=values["LLAMA_PROXY_MAX_BODY_BYTES"],
        backend_wait_seconds=values["LLAMA_PROXY_BACKEND_WAIT_SECONDS"],
        backend_concurrency=values["LLAMA_PROXY_BACKEND_CONCURRENCY"],
        queue_max_per_user=values["LLAMA_PROXY_QUEUE_MAX_PER_USER"],
        queue_max_total=values["LLAMA_PROXY_QUEUE_MAX_TOTAL"],
        queue_timeout_seconds=values["LLAMA_PROXY_QUEUE_TIMEOUT_SECONDS"],
        upstream_timeout_seconds=values["LLAMA_PROXY_UPSTREAM_TIMEOUT_SECONDS"],
        drain_seconds=values["LLAMA_PROXY_DRAIN_SECONDS"],
        auth_outage_grace_seconds=values["LLAMA_PROXY_AUTH_OUTAGE_GRACE_SECONDS"],
        metrics_token=values["LLAMA_PROXY_METRICS_TOKEN"],
        client_timeout_seconds=values["LLAMA_PROXY_CLIENT_TIMEOUT_SECONDS"],
        auth_failures_per_minute=values["LLAMA_PROXY_AUTH_FAILURES_PER_MINUTE"],
        request_max_seconds=values["LLAMA_PROXY_REQUEST_MAX_SECONDS"],
        max_tokens=values["LLAMA_PROXY_MAX_TOKENS"],
        me_cache_seconds=values["LLAMA_PROXY_ME_CACHE_SECONDS"],
        model_name=environ.get(MODEL_NAME_KEY, ""),
        db_command_timeout_seconds=values["LLAMA_PROXY_DB_COMMAND_TIMEOUT_SECONDS"],
        db_acquire_timeout_seconds=values["LLAMA_PROXY_DB_ACQUIRE_TIMEOUT_SECONDS"],
        spool_max_mb=values["LLAMA_PROXY_SPOOL_MAX_MB"],
    )


def _restart_flag_max_age(environ: Mapping[str, str]) -> float:
    raw = environ.get(RESTART_FLAG_MAX_AGE_KEY, str(DEFAULT_RESTART_FLAG_MAX_AGE_SECONDS))
    try:
        return parse_positive_float(raw)
    except ValueError as error:
        raise ProxyConfigError(
            f"invalid {RESTART_FLAG_MAX_AGE_KEY}={raw!r} from the environment: {error}; "
            f"the console sets it, so unset it"
        ) from None
