"""runtime/backend.py and runtime/gateway.py: the name clients see for the model, which
the console gives both llama_cpp.server and the gateway, so that no answer shows the
model's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config
from runtime.backend import backend_command
from runtime.gateway import GatewaySupervisor
from runtime.settings import Paths, load_settings

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    paths = Paths(root=tmp_path)
    paths.runtime_dir.mkdir()
    paths.models_dir.mkdir()
    (paths.models_dir / MODEL_NAME).write_bytes(b"GGUF")
    return paths


def alias_flag(settings, model: Path) -> str:
    command = backend_command(settings, model)
    return command[command.index("--model_alias") + 1]


def gateway_config(settings):
    environment = GatewaySupervisor(settings, dsn="postgresql://x@h/db", environ={}).environment()
    return load_config(environment)


def test_backend_names_the_model_by_its_file_name_never_its_path(paths):
    model = paths.models_dir / MODEL_NAME
    assert alias_flag(load_settings(paths, {}, {}), model) == MODEL_NAME


def test_backend_names_the_model_by_llama_model_alias_when_set(paths):
    settings = load_settings(paths, {}, {"LLAMA_MODEL_ALIAS": "house-model"})
    assert alias_flag(settings, paths.models_dir / MODEL_NAME) == "house-model"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LLAMA_MODEL": MODEL_NAME.removesuffix(".gguf")}, MODEL_NAME),
        ({"LLAMA_MODEL_ALIAS": "house-model"}, "house-model"),
        ({"LLAMA_MODEL": "/elsewhere/missing.gguf"}, "missing.gguf"),
    ],
)
def test_the_gateway_gets_the_name_the_backend_gives_the_model(paths, environ, expected):
    assert gateway_config(load_settings(paths, {}, environ)).model_name == expected


def test_a_gateway_not_started_by_the_console_names_no_model():
    assert load_config({"POSTGRES_AUTH_DSN": "postgresql://x@h/db"}).model_name == ""
