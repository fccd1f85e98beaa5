"""The gateway's configuration, read from the environment into a frozen ProxyConfig.

This is the only proxy module that reads os.environ. The keys themselves are declared in
proxy/configschema.py; ProxyConfig is the gateway's section of that schema plus what the
console hands the gateway process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from proxy.configparse import parse_backend_urls, parse_positive_float, parse_text
from proxy.configschema import (
    DatabaseKeys,
    GatewayKeys,
    Key,
    build,
    keys_of,
    setting,
    values_of,
)

T = TypeVar("T")

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
# The model's GGUF file, whose chat template counts a chat stream's prompt tokens.
MODEL_PATH_KEY = "LLAMA_PROXY_MODEL_PATH"


class ProxyConfigError(Exception):
    """A gateway setting is invalid; the message names the key."""


def _parse_optional_path(value: str) -> Path | None:
    return Path(value) if value else None


@dataclass(frozen=True)
class ProxyConfig(GatewayKeys):
    """Everything the gateway needs, parsed and validated: its keys and the console's."""

    dsn: str = ""
    # One base URL per backend (replica), comma-separated; see proxy/pool.py.
    backend_urls: tuple[str, ...] = setting(
        BACKEND_URL_KEY,
        "http://127.0.0.1:8000",
        parse_backend_urls,
        "the backends' base URLs, comma-separated",
    )
    backend_key: str = setting(
        BACKEND_KEY_KEY, "", parse_text, "the backend's bearer key", is_secret=True
    )
    spool_path: Path = setting(
        SPOOL_KEY, "llama_requests.spool", Path, "request-log rows waiting for PostgreSQL"
    )
    restart_flag: Path | None = setting(
        RESTART_FLAG_KEY, "", _parse_optional_path, "present while the backend restarts"
    )
    restart_flag_max_age_seconds: float = setting(
        RESTART_FLAG_MAX_AGE_KEY,
        str(DEFAULT_RESTART_FLAG_MAX_AGE_SECONDS),
        parse_positive_float,
        "an older restart flag is stale and ignored",
    )
    # The model's alias, for requests that name no model ("": leave them as they are).
    model_name: str = setting(MODEL_NAME_KEY, "", parse_text, "the name clients see for the model")
    model_path: Path | None = setting(
        MODEL_PATH_KEY, "", _parse_optional_path, "the GGUF file, for its chat template"
    )

    @property
    def spool_max_bytes(self) -> int:
        return self.spool_max_mb * 1024 * 1024


def parse_key(key: Key, raw: str, source: str = "the environment") -> Any:
    """Parse one value; a ValueError becomes a ProxyConfigError naming the key."""
    try:
        return key.parse(raw.strip())
    except ValueError as error:
        raise ProxyConfigError(f"invalid {key.described(raw)} from {source}: {error}") from None


def load_section(section: type[T], environ: Mapping[str, str] | None = None, **others: Any) -> T:
    """One section of the schema from the environment; raise ProxyConfigError."""
    environ = os.environ if environ is None else environ
    parsed = {
        key.name: parse_key(key, environ.get(key.name, key.default)) for key in keys_of(section)
    }
    return build(section, parsed, **others)


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
    dsn = database_dsn(values_of(load_section(DatabaseKeys, environ)))
    if not dsn:
        raise ProxyConfigError(
            "no database: set POSTGRES_AUTH_DSN (or POSTGRES_AUTH_HOST and friends); "
            "./console.sh start sets it for the private cluster"
        )
    return load_section(ProxyConfig, environ, dsn=dsn)


def load_pool_view(environ: Mapping[str, str] | None = None) -> tuple[str, tuple[str, ...]]:
    """The pool's model name and this host's replica URLs, as the console hands them to the
    gateway; for the admin CLI, which shows and checks against them. '' and () where unset
    (or invalid: the gateway reports that, not the admin CLI)."""
    environ = os.environ if environ is None else environ
    try:
        urls = parse_backend_urls(environ[BACKEND_URL_KEY]) if environ.get(BACKEND_URL_KEY) else ()
    except ValueError:
        urls = ()
    return environ.get(MODEL_NAME_KEY, "").strip(), urls
