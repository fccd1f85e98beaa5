"""`console.sh info`: what the console knows, laid out for a bug report. Never raises."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path

from proxy.chargespool import charge_spool_path
from proxy.config import redact_dsn
from proxy.configschema import Key
from runtime.pgcluster import ClusterError
from runtime.pglocation import find_place
from runtime.service import component_statuses
from runtime.settings import KEYS, ConfigError, Paths, Settings, load_settings

PACKAGES = (
    "llama-cpp-python",
    "huggingface_hub",
    "gguf",
    "aiohttp",
    "asyncpg",
    "prometheus_client",
    "click",
)


def render_info(paths: Paths) -> str:
    """The whole report as text."""
    sections = [_paths_section(paths), _versions_section()]
    try:
        settings = load_settings(paths)
    except ConfigError as error:
        sections.insert(0, f"configuration: INVALID: {error}")
        return "\n\n".join(sections)
    sections.insert(0, _config_section(settings))
    sections.append(_parts_section(settings))
    return "\n\n".join(sections)


def _config_section(settings: Settings) -> str:
    rows = [(key.name, _shown_value(key, settings[key.name])) for key in KEYS]
    # Columns as wide as their longest cell, so that long key names and values stay aligned.
    name_width = max(len(name) for name, _ in rows)
    value_width = max(len(value) for _, value in rows)
    lines = ["configuration (value, then where it came from):"]
    for name, value in rows:
        lines.append(f"  {name:<{name_width}} {value:<{value_width}} {settings.source_of(name)}")
    return "\n".join(lines)


def _shown_value(key: Key, value: object) -> str:
    if key.name == "POSTGRES_AUTH_DSN":
        return redact_dsn(str(value))  # where the database is helps a bug report
    if key.is_secret:
        return "(set, hidden)" if value else "(empty)"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, tuple):
        return " ".join(value)
    return "" if value is None else str(value)


def _paths_section(paths: Paths) -> str:
    rows = {
        "root": paths.root,
        "config.env": paths.config_env,
        ".env": paths.dotenv,
        "models": paths.models_dir,
        "logs": paths.logs_dir,
        "run": paths.run_dir,
        "venv python": paths.venv_python,
    }
    lines = ["paths:"]
    for label, path in rows.items():
        lines.append(f"  {label:<12} {path}{'' if path.exists() else '  (missing)'}")
    return "\n".join([*lines, _pgdata_line(paths)])


def _pgdata_line(paths: Paths) -> str:
    """Where the private cluster's data lives, which is outside the checkout for some roots."""
    try:
        place = find_place(paths)
    except ClusterError as error:
        return f"  {'pgdata':<12} unknown: {error}"
    where = f" (outside the checkout: {place.home})" if place.is_out_of_tree else ""
    missing = "" if place.data_dir.exists() else "  (missing)"
    return f"  {'pgdata':<12} {place.data_dir}{missing}{where}"


def _versions_section() -> str:
    lines = [f"versions:\n  python       {platform.python_version()}"]
    for package in PACKAGES:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "not installed; run runtime/install.sh"
        lines.append(f"  {package:<18} {version}")
    return "\n".join(lines)


def _replicas_line(settings: Settings) -> str:
    """How many llama_cpp.server processes, where, with how many threads and which GPUs."""
    replicas = settings.replicas
    if not replicas:
        return "backend replicas: 0 (gateway only: the backends are those added with add-backend)"
    ports = ", ".join(str(replica.port) for replica in replicas)
    line = (
        f"backend replicas: {len(replicas)} (port {ports}), "
        f"{settings.server.n_threads} thread(s) each"
    )
    if settings.server.replica_gpus:
        line += f", GPUs {', '.join(replica.gpu for replica in replicas)}"
    return line


def _parts_section(settings: Settings) -> str:
    lines = [f"mode: {settings.mode_name}"]
    lines.append(_replicas_line(settings))
    if settings.is_backend_only:
        lines.append(
            f"replicas listen on {settings.backend_host} (LLAMA_SERVER_HOST), for the "
            f"gateways of other hosts; no database, no gateway here"
        )
    for name, status in component_statuses(settings).items():
        lines += [f"{name}:", f"  url          {status.url}", f"  state        {status.state}"]
        if status.detail:
            lines.append(f"  detail       {status.detail}")
        if status.pid:
            lines.append(f"  pid          {status.pid}")
        if status.model:
            lines.append(f"  model        {status.model}")
    if settings.is_gateway_mode:
        lines += _spool_lines(settings.paths.spool_path)
    return "\n".join(lines)


def _spool_lines(request_spool: Path) -> list[str]:
    """Whether the gateway's spools hold what the database has not taken yet."""
    spools = [
        ("request-log spool", request_spool, "rows"),
        ("token-charge spool", charge_spool_path(request_spool), "token charges"),
    ]
    return [
        f"{label}: {path}"
        + (f" ({what} waiting for the database)" if path.exists() else " (empty)")
        for label, path, what in spools
    ]
