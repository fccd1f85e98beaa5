"""Load the console's configuration: flags, environment, .env, runtime/config.env, defaults.

This is the only module that reads os.environ or configuration files. It returns a
frozen `Settings`, which remembers where each value came from (for `info` and for
error messages that name the file to fix).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from proxy.config import (
    DATABASE_KEYS,
    GATEWAY_KEYS,
    Key,
    database_dsn,
    parse_host,
    parse_optional_int,
    parse_port,
    parse_positive_float,
    parse_positive_int,
    parse_text,
)

FALLBACK_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CODE_DIR = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A configuration value is invalid; the message names the key and its source."""


@dataclass(frozen=True)
class Paths:
    """Where state lives. LLAMAGATE_ROOT moves it all (tests use a temp dir)."""

    root: Path

    @property
    def runtime_dir(self) -> Path:
        return self.root / "runtime"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def config_env(self) -> Path:
        return self.runtime_dir / "config.env"

    @property
    def dotenv(self) -> Path:
        return self.root / ".env"

    @property
    def logs_dir(self) -> Path:
        return self.runtime_dir / "logs"

    @property
    def run_dir(self) -> Path:
        return self.runtime_dir / "run"

    @property
    def pgdata_dir(self) -> Path:
        return self.runtime_dir / "pgdata"

    @property
    def db_socket_dir(self) -> Path:
        return self.run_dir / "pg"

    @property
    def spool_path(self) -> Path:
        """Request-log rows waiting for PostgreSQL; outside run/ so that it is never cleaned."""
        return self.runtime_dir / "spool" / "llama_requests.jsonl"

    @property
    def restart_flag(self) -> Path:
        """Present while the console restarts the backend, so the gateway holds requests."""
        return self.run_dir / "backend.restarting"

    @property
    def venv_python(self) -> Path:
        return CODE_DIR / "runtime" / ".venv" / "bin" / "python"


def _args(value: str) -> tuple[str, ...]:
    return tuple(shlex.split(value))


MODEL = "Model and backend"
CONSOLE = "Console and supervision"

KEYS: tuple[Key, ...] = (
    Key(
        "LLAMA_MODEL",
        FALLBACK_MODEL_NAME,
        parse_text,
        "GGUF file to serve: a path, or a file name in models/ (see ./console.sh models)",
        MODEL,
    ),
    Key(
        "LLAMA_MODEL_ALIAS",
        "",
        parse_text,
        "name clients see for the model in /v1/models and answers (empty: its file name)",
        MODEL,
    ),
    Key(
        "LLAMA_SERVER_HOST",
        "127.0.0.1",
        parse_host,
        "address llama_cpp.server listens on in single-key mode (gateway mode: 127.0.0.1)",
        MODEL,
    ),
    Key("LLAMA_SERVER_PORT", "8000", parse_port, "port llama_cpp.server listens on", MODEL),
    Key(
        "LLAMA_API_KEY",
        "",
        parse_text,
        "the backend's bearer key (generated): clients send it in single-key mode; in "
        "gateway mode only the gateway does",
        MODEL,
    ),
    Key(
        "LLAMA_N_CTX",
        "",
        parse_optional_int,
        "context window in tokens (empty: llama_cpp.server's default, 2048)",
        MODEL,
    ),
    Key(
        "LLAMA_N_THREADS",
        "",
        parse_optional_int,
        "CPU threads for generation (empty: llama_cpp.server's default)",
        MODEL,
    ),
    Key(
        "LLAMA_N_GPU_LAYERS",
        "",
        parse_optional_int,
        "layers to offload to the GPU, -1 for all (needs a GPU build)",
        MODEL,
    ),
    Key(
        "LLAMA_EXTRA_ARGS",
        "",
        _args,
        "further llama_cpp.server flags, shell-quoted, e.g. --n_batch 256",
        MODEL,
    ),
    Key(
        "LLAMA_START_TIMEOUT_SECONDS",
        "120",
        parse_positive_float,
        "how long start waits for the backend to answer before giving up",
        CONSOLE,
    ),
    Key(
        "LLAMA_STOP_GRACE_SECONDS",
        "10",
        parse_positive_float,
        "how long stop waits after SIGTERM before it sends SIGKILL",
        CONSOLE,
    ),
    Key(
        "LLAMA_LOG_MAX_BYTES",
        "10485760",
        parse_positive_int,
        "size at which runtime/logs/backend.log is rotated",
        CONSOLE,
    ),
    Key("LLAMA_LOG_BACKUPS", "3", parse_positive_int, "rotated log files to keep", CONSOLE),
    Key(
        "LLAMA_RESTART_BACKOFF_SECONDS",
        "1",
        parse_positive_float,
        "foreground mode: first wait before restarting a crashed backend; doubles each time",
        CONSOLE,
    ),
    Key(
        "LLAMA_RESTART_MAX_CRASHES",
        "5",
        parse_positive_int,
        "foreground mode: give up after this many crashes...",
        CONSOLE,
    ),
    Key(
        "LLAMA_RESTART_WINDOW_SECONDS",
        "300",
        parse_positive_float,
        "...within this many seconds",
        CONSOLE,
    ),
)
KEYS += GATEWAY_KEYS + DATABASE_KEYS
KEY_NAMES = frozenset(key.name for key in KEYS)


@dataclass(frozen=True)
class Settings:
    """The console's configuration, already parsed and validated."""

    paths: Paths
    values: Mapping[str, Any]
    sources: Mapping[str, str] = field(repr=False)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def source_of(self, name: str) -> str:
        return self.sources[name]

    @property
    def is_gateway_mode(self) -> bool:
        return self["LLAMA_PROXY_ENABLED"]

    @property
    def backend_host(self) -> str:
        """Where the backend listens: loopback only when the gateway stands in front."""
        return "127.0.0.1" if self.is_gateway_mode else self["LLAMA_SERVER_HOST"]

    @property
    def external_dsn(self) -> str:
        """The operator's own PostgreSQL (POSTGRES_AUTH_*), or '' for the private cluster."""
        return database_dsn(self.values)

    @property
    def gateway_url(self) -> str:
        return _local_url(self["LLAMA_PROXY_HOST"], self["LLAMA_PROXY_PORT"])

    @property
    def backend_url(self) -> str:
        return _local_url(self.backend_host, self["LLAMA_SERVER_PORT"])


def _local_url(host: str, port: int) -> str:
    """The URL this machine reaches a listener on; a wildcard address is reached via loopback."""
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    if ":" in probe_host:
        probe_host = f"[{probe_host}]"
    return f"http://{probe_host}:{port}"


def paths_from_env(environ: Mapping[str, str] | None = None) -> Paths:
    """Paths for this process: LLAMAGATE_ROOT if set, else the checkout itself."""
    environ = os.environ if environ is None else environ
    root = environ.get("LLAMAGATE_ROOT")
    return Paths(root=Path(root).resolve() if root else CODE_DIR)


def load_settings(
    paths: Paths | None = None,
    flags: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    is_strict: bool = True,
) -> Settings:
    """Merge every source by precedence and validate each value; raise ConfigError.

    With is_strict=False, invalid values fall back to their defaults, so that read-only
    commands (status) can still report the truth about a broken configuration.
    """
    environ = os.environ if environ is None else environ
    paths = paths or paths_from_env(environ)
    layers = _read_layers(paths, flags or {}, environ, is_strict)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key in KEYS:
        raw, source = key.default, "default"
        for layer_name, layer in layers:
            if key.name in layer:
                raw, source = layer[key.name], layer_name
                break
        try:
            values[key.name] = _parse(key, raw, source)
        except ConfigError:
            if is_strict:
                raise
            raw, source = key.default, "default"
            values[key.name] = _parse(key, raw, source)
        sources[key.name] = source
    return Settings(paths=paths, values=values, sources=sources)


def _read_layers(
    paths: Paths, flags: Mapping[str, str], environ: Mapping[str, str], is_strict: bool
) -> list[tuple[str, Mapping[str, str]]]:
    """The sources, highest precedence first."""
    config_values = _read_env_file(paths.config_env)
    unknown = sorted(set(config_values) - KEY_NAMES)
    if unknown and is_strict:
        raise ConfigError(
            f"unknown key {unknown[0]} in {paths.config_env}; remove it or fix its spelling "
            f"(the keys are listed in .env.example)"
        )
    dotenv_known = {k: v for k, v in _read_env_file(paths.dotenv).items() if k in KEY_NAMES}
    environ_known = {k: v for k, v in environ.items() if k in KEY_NAMES}
    config_values = {k: v for k, v in config_values.items() if k in KEY_NAMES}
    return [
        ("command-line flag", flags),
        ("environment", environ_known),
        (str(paths.dotenv), dotenv_known),
        (str(paths.config_env), config_values),
    ]


def _read_env_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    return {k: (v or "") for k, v in dotenv_values(path).items()}


def _parse(key: Key, raw: str, source: str) -> Any:
    try:
        return key.parse(raw.strip())
    except ValueError as error:
        reason = str(error)
        where = f"in {source}" if source.startswith("/") else f"from the {source}"
        raise ConfigError(f"invalid {key.name}={raw!r} {where}: {reason}; fix it there") from None
