"""Load the console's configuration: flags, environment, .env, runtime/config.env, defaults.

This is the only module that reads os.environ or configuration files. It returns a
frozen `Settings`, which remembers where each value came from (for `info` and for
error messages that name the file to fix).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from proxy.config import database_dsn

# FALLBACK_MODEL_NAME is re-exported: the console and its tests know it from here.
from proxy.configschema import FALLBACK_MODEL_NAME as FALLBACK_MODEL_NAME
from proxy.configschema import (
    KEY_NAMES,
    KEYS,
    ConsoleKeys,
    DatabaseKeys,
    GatewayKeys,
    Key,
    ServerKeys,
    build,
    values_of,
)
from runtime.replicas import Replica, default_threads, replica_ports, replica_problem
from runtime.runmode import is_remembered_backend_only

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


@dataclass(frozen=True)
class Settings:
    """The console's configuration, already parsed and validated, one section per concern."""

    paths: Paths
    server: ServerKeys
    console: ConsoleKeys
    gateway: GatewayKeys
    database: DatabaseKeys
    sources: Mapping[str, str] = field(repr=False)
    # Each value's text as found, so that the gateway process gets what the operator
    # wrote rather than a re-rendering of what the console parsed.
    texts: Mapping[str, str] = field(repr=False)
    # `start --backend-only` (runtime/runmode.py): the replicas alone, no database, no gateway.
    is_backend_only: bool = False

    @property
    def values(self) -> dict[str, Any]:
        """Every value by key name, for code that walks the keys (info, tests)."""
        sections = (self.server, self.console, self.gateway, self.database)
        return {name: value for section in sections for name, value in values_of(section).items()}

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def source_of(self, name: str) -> str:
        return self.sources[name]

    @property
    def is_gateway_mode(self) -> bool:
        """Whether this host runs the gateway (and its database) in front of its replicas."""
        return self.gateway.enabled and not self.is_backend_only

    @property
    def has_replicas(self) -> bool:
        """False on a gateway-only host (LLAMA_SERVER_REPLICAS=0): no llama_cpp.server here."""
        return self.server.replicas > 0

    @property
    def mode_name(self) -> str:
        """The mode as status and info name it."""
        if self.is_backend_only:
            return "backend only"
        if not self.is_gateway_mode:
            return "single-key"
        return "gateway" if self.has_replicas else "gateway only (LLAMA_SERVER_REPLICAS=0)"

    @property
    def backend_host(self) -> str:
        """Where the backend listens: loopback only when this host's gateway stands in front.

        In single-key mode and backend-only mode, LLAMA_SERVER_HOST: clients, or the
        gateways of other hosts, call the replicas themselves.
        """
        return "127.0.0.1" if self.is_gateway_mode else self.server.host

    @property
    def external_dsn(self) -> str:
        """The operator's own PostgreSQL (POSTGRES_AUTH_*), or '' for the private cluster."""
        return database_dsn(values_of(self.database))

    @property
    def gateway_url(self) -> str:
        return _local_url(self.gateway.host, self.gateway.port)

    @property
    def backend_url(self) -> str:
        """Replica 0's URL: the backend's, when there is one; '' on a gateway-only host."""
        return self.replicas[0].url if self.has_replicas else ""

    @property
    def backend_urls(self) -> str:
        """Every replica's URL, comma-separated, for the gateway; '' with none (gateway only)."""
        return ",".join(replica.url for replica in self.replicas)

    @property
    def replicas(self) -> tuple[Replica, ...]:
        """The configured replicas of llama_cpp.server (runtime/replicas.py)."""
        return tuple(self.replica(index) for index in range(self.server.replicas))

    def replica(self, index: int) -> Replica:
        """Replica index, also one beyond LLAMA_SERVER_REPLICAS (left over from a shrink)."""
        skipped = self.gateway.port if self.is_gateway_mode else None
        port = replica_ports(self.server.port, index + 1, skipped)[-1]
        gpus = self.server.replica_gpus
        return Replica(
            index=index,
            host=self.backend_host,
            port=port,
            url=_local_url(self.backend_host, port),
            threads=self.server.n_threads,
            gpu=gpus[index] if index < len(gpus) else "",
        )


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
    cpu_count: int | None = None,
    backend_only: bool | None = None,
) -> Settings:
    """Merge every source by precedence and validate each value; raise ConfigError.

    With is_strict=False, invalid values fall back to their defaults, so that read-only
    commands (status) can still report the truth about a broken configuration.
    cpu_count stands in for the cores this process may use (tests). backend_only is
    `start --backend-only`'s choice; None takes the one remembered in run/mode.
    """
    environ = os.environ if environ is None else environ
    paths = paths or paths_from_env(environ)
    if backend_only is None:
        backend_only = is_remembered_backend_only(paths.run_dir)
    layers = _read_layers(paths, flags or {}, environ, is_strict)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    texts: dict[str, str] = {}
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
        sources[key.name], texts[key.name] = source, raw
    _check_replicas(values, sources, texts, is_strict, backend_only)
    if values["LLAMA_N_THREADS"] is None:
        replicas = max(1, values["LLAMA_SERVER_REPLICAS"])
        values["LLAMA_N_THREADS"] = default_threads(replicas, cpu_count)
        # Say where the empty value came from (config.env writes every key), and what it meant.
        given = sources["LLAMA_N_THREADS"]
        share = f"the cores ÷ {replicas} replica(s)"
        sources["LLAMA_N_THREADS"] = (
            f"default ({share})" if given == "default" else f"{given} (empty: {share})"
        )
    sections = {
        "server": build(ServerKeys, values),
        "console": build(ConsoleKeys, values),
        "gateway": build(GatewayKeys, values),
        "database": build(DatabaseKeys, values),
    }
    return Settings(
        paths=paths, **sections, sources=sources, texts=texts, is_backend_only=backend_only
    )


def _check_replicas(
    values: dict[str, Any],
    sources: dict[str, str],
    texts: dict[str, str],
    is_strict: bool,
    is_backend_only: bool,
) -> None:
    """The rules across the replica keys; leniently, a single replica on the first port."""
    problem = replica_problem(values, lambda name: _where(sources[name]), is_backend_only)
    if problem is None:
        return
    if is_strict:
        raise ConfigError(problem)
    for name, default in (("LLAMA_SERVER_REPLICAS", 1), ("LLAMA_REPLICA_GPUS", ())):
        values[name], sources[name], texts[name] = default, "default", str(default or "")


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
        raise ConfigError(
            f"invalid {key.described(raw)} {_where(source)}: {reason}; fix it there"
        ) from None


def _where(source: str) -> str:
    """Where a value came from, as the end of a sentence: in FILE, from the environment."""
    if source == "default":
        return "by default"
    return f"in {source}" if source.startswith("/") else f"from the {source}"
