"""How llama_cpp.server is launched, probed and diagnosed: the facts of llama-cpp-python 0.3.

- It reads env vars named after its settings (HOST, PORT, MODEL, API_KEY, ...), and
  HOST/PORT even beat --host/--port, so the child gets an allowlisted environment.
- With interrupt_requests=true any queued request cuts a live stream short.
- The port opens only once the model has loaded; /openapi.json needs no auth and
  takes no lock, whereas /v1/models waits behind a running generation.
"""

from __future__ import annotations

import http.client
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from runtime.replicas import Replica
from runtime.settings import Settings

SERVER_MODULE = "llama_cpp.server"
READINESS_PATH = "/openapi.json"

# Variables the backend may see. Everything else, above all HOST, PORT, MODEL and
# API_KEY in any letter case, is dropped.
PASSED_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "TMPDIR",
        "USER",
        "LOGNAME",
        "LD_LIBRARY_PATH",
    }
)
_PASSED_PREFIXES = ("CUDA_", "HIP_", "ROCR_", "GGML_", "OMP_", "LLAMA_CPP_LIB")


def backend_command(
    settings: Settings, model_path: Path, replica: Replica | None = None
) -> list[str]:
    """argv for llama_cpp.server (replica 0 unless told); the API key travels in the environment."""
    replica = replica or settings.replicas[0]
    command = [
        sys.executable,
        "-m",
        SERVER_MODULE,
        "--model",
        str(model_path),
        "--host",
        settings.backend_host,
        "--port",
        str(replica.port),
        # The gateway (or the client) owns queueing; a queued request must never cut a
        # live stream short.
        "--interrupt_requests",
        "false",
    ]
    optional = {
        "--model_alias": model_alias(settings, model_path),
        "--n_ctx": settings.server.n_ctx,
        "--n_threads": replica.threads,
        # Its default is every core, which replicas processing prompts at once would
        # oversubscribe; LLAMA_EXTRA_ARGS comes later, so it can still set another.
        "--n_threads_batch": replica.threads if settings.server.replicas > 1 else None,
        "--n_gpu_layers": settings.server.n_gpu_layers,
    }
    for flag, value in optional.items():
        if value is not None:
            command += [flag, str(value)]
    return command + list(settings.server.extra_args)


def model_alias(settings: Settings, model_path: Path) -> str:
    """The name clients see for the model: LLAMA_MODEL_ALIAS, else the file's name.

    Without an alias llama_cpp.server names the model by its absolute path in /v1/models
    and in every answer's `model`, which tells every client where the operator keeps it.
    """
    return settings.server.model_alias or model_path.name


def backend_environment(
    settings: Settings, environ: Mapping[str, str], replica: Replica | None = None
) -> dict[str, str]:
    """A cleaned environment for the child, with the API key and the replica's GPU added."""
    cleaned = {
        name: value
        for name, value in environ.items()
        if name in PASSED_NAMES or name.startswith(_PASSED_PREFIXES)
    }
    if replica is not None and replica.gpu:
        cleaned["CUDA_VISIBLE_DEVICES"] = replica.gpu
    if settings.server.api_key:
        cleaned["API_KEY"] = settings.server.api_key
    cleaned["PYTHONUNBUFFERED"] = "1"
    return cleaned


def is_answering(base_url: str, timeout: float = 1.0) -> bool:
    """True if GET /openapi.json answers 200 (the model is loaded and the port is open)."""
    return answers_http(base_url, READINESS_PATH, timeout)


def answers_http(base_url: str, path: str, timeout: float) -> bool:
    """True if GET base_url + path answers 200 within timeout."""
    host_port = base_url.removeprefix("http://")
    connection = http.client.HTTPConnection(host_port, timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


_FAILURE_PATTERNS = (
    (
        re.compile(r"unrecognized arguments: .*"),
        "llama_cpp.server refused its flags ({match}); fix LLAMA_EXTRA_ARGS",
    ),
    (
        re.compile(r"address already in use|Errno 98", re.I),
        "port {port} on {host} is already in use; stop what uses it or set LLAMA_SERVER_PORT",
    ),
    (
        re.compile(r"Failed to load model|gguf_init|invalid magic|failed to read", re.I),
        "the model {model} could not be loaded (corrupt or not a GGUF file); "
        "pull it again or choose another with ./console.sh use NAME",
    ),
    (
        re.compile(r"No such file or directory|does not exist", re.I),
        "the model {model} does not exist; see ./console.sh models",
    ),
    (
        re.compile(r"No module named|ImportError", re.I),
        "llama-cpp-python is not installed correctly; run runtime/install.sh",
    ),
)


def explain_failure(
    log_tail: str, settings: Settings, model_path: Path, port: int | None = None
) -> str:
    """One line that says why the backend exited, judged from the end of its log."""
    for pattern, message in _FAILURE_PATTERNS:
        found = pattern.search(log_tail)
        if found:
            return message.format(
                port=port or settings.server.port,
                host=settings.server.host,
                model=model_path,
                match=found.group(0),
            )
    return "the backend exited during start-up; the end of its log follows"
