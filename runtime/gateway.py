"""The gateway process (`python -m proxy`), supervised like the backend.

The console hands the gateway its whole configuration through a cleaned environment:
the LLAMA_PROXY_* settings, the backend's URL and internal key, the database DSN and
where to spool the request log. The gateway knows nothing else of the console.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from proxy.config import (
    BACKEND_KEY_KEY,
    BACKEND_URL_KEY,
    MODEL_NAME_KEY,
    MODEL_PATH_KEY,
    RESTART_FLAG_KEY,
    RESTART_FLAG_MAX_AGE_KEY,
    SPOOL_KEY,
)
from proxy.configschema import GatewayKeys, keys_of
from runtime.backend import PASSED_NAMES, answers_http, model_alias
from runtime.modelfiles import ModelError, resolve_model
from runtime.procs import read_pidfile
from runtime.settings import CODE_DIR, Settings
from runtime.supervisor import ProcessSupervisor

GATEWAY_MODULE = "proxy"
HEALTH_PATH = "/healthz"
FLUSH_MARGIN_SECONDS = 5.0
# Beyond the stop grace and the start timeout, a restart spends up to 5 s on SIGKILL and
# up to 30 s starting the private PostgreSQL while it holds the restart flag.
RESTART_FLAG_MARGIN_SECONDS = 35.0


def served_model_name(settings: Settings) -> str:
    """The name the backend gives the model (see model_alias), as the gateway should too."""
    return model_alias(settings, served_model_path(settings))


def served_model_path(settings: Settings) -> Path:
    try:
        return resolve_model(settings.server.model, settings.paths.models_dir)
    except ModelError:
        return Path(settings.server.model)  # the start that follows will say what is wrong


class GatewaySupervisor(ProcessSupervisor):
    """Starts, probes and stops the gateway."""

    name = "proxy"
    marker = f"-m {GATEWAY_MODULE}"

    def __init__(
        self,
        settings: Settings,
        dsn: str = "",
        environ: Mapping[str, str] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        super().__init__(settings, environ, echo)
        self.dsn = dsn

    @property
    def url(self) -> str:
        return self.settings.gateway_url

    @property
    def listen_address(self) -> tuple[str, int, str]:
        return (
            self.settings.gateway.host,
            self.settings.gateway.port,
            "LLAMA_PROXY_PORT",
        )

    @property
    def stop_grace_seconds(self) -> float:
        # The gateway drains in-flight requests and then flushes the request log: a
        # SIGKILL before that would lose rows.
        drain = self.settings.gateway.drain_seconds + FLUSH_MARGIN_SECONDS
        return max(self.settings.console.stop_grace_seconds, drain)

    def command(self) -> list[str]:
        return [sys.executable, "-m", GATEWAY_MODULE]

    def environment(self) -> dict[str, str]:
        settings = self.settings
        paths = settings.paths
        cleaned = {name: value for name, value in self.environ.items() if name in PASSED_NAMES}
        # The text the operator wrote, which the gateway parses with the same schema; the
        # console has validated it already, so the gateway cannot refuse it.
        cleaned.update({key.name: settings.texts[key.name] for key in keys_of(GatewayKeys)})
        cleaned.update(
            {
                # One URL per replica, comma-separated; one replica gives one URL.
                BACKEND_URL_KEY: settings.backend_urls,
                BACKEND_KEY_KEY: settings.server.api_key,
                "POSTGRES_AUTH_DSN": self.dsn,
                SPOOL_KEY: str(paths.spool_path),
                RESTART_FLAG_KEY: str(paths.restart_flag),
                RESTART_FLAG_MAX_AGE_KEY: str(restart_flag_max_age(settings)),
                MODEL_NAME_KEY: served_model_name(settings),
                MODEL_PATH_KEY: str(served_model_path(settings)),
                # The gateway's code lives in the checkout, wherever the state root is.
                "PYTHONPATH": str(CODE_DIR),
                "PYTHONUNBUFFERED": "1",
            }
        )
        return cleaned

    def details(self) -> dict[str, str]:
        return {"backends": self.settings.backend_urls}

    def served_backends(self) -> str | None:
        """The replica URLs the running gateway was started with; None if it did not say."""
        record = read_pidfile(self.pidfile)
        return record.details.get("backends") if record else None

    def is_answering(self, url: str, timeout: float = 1.0) -> bool:
        return answers_http(url, HEALTH_PATH, timeout)

    def explain_failure(self, log_tail: str) -> str:
        for line in reversed(log_tail.splitlines()):
            if line.startswith("gateway: error: "):
                return line.removeprefix("gateway: error: ")
        return "the gateway exited during start-up; the end of its log follows"


def restart_flag_max_age(settings: Settings) -> float:
    """How long the gateway honours the restart flag: the longest a restart keeps it."""
    grace, timeout = settings.console.stop_grace_seconds, settings.console.start_timeout_seconds
    return grace + timeout + RESTART_FLAG_MARGIN_SECONDS
