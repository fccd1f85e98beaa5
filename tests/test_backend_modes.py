"""The two host roles of a pool across hosts, as pure logic: backend only and gateway only.

`start --backend-only` (runtime/runmode.py, runtime/backendonly.py) and
LLAMA_SERVER_REPLICAS=0; the console running them for real is in
test_console_backend_only.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import BACKEND_URL_KEY
from runtime.backend import backend_command
from runtime.backendonly import loopback_warning, registration_lines
from runtime.gateway import GatewaySupervisor
from runtime.runmode import is_remembered_backend_only, remember_mode
from runtime.service import Stack, check_ready_to_start
from runtime.settings import ConfigError, Paths, load_settings

MODEL = Path("/models/m.gguf")
KEY = "secret-key-of-this-host-0123456789"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    paths = Paths(root=tmp_path)
    paths.runtime_dir.mkdir()
    return paths


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_backend_only_replicas_listen_on_the_server_host_without_gateway_or_database(paths):
    environ = {"LLAMA_SERVER_HOST": "0.0.0.0", "LLAMA_SERVER_REPLICAS": "2"}
    settings = load_settings(paths, {}, environ, backend_only=True)
    assert not settings.is_gateway_mode and settings.mode_name == "backend only"
    # No gateway on this host, so its port (8001) is not skipped.
    assert [replica.port for replica in settings.replicas] == [8000, 8001]
    for replica in settings.replicas:
        assert flag_value(backend_command(settings, MODEL, replica), "--host") == "0.0.0.0"
    stack = Stack(settings)
    assert stack.database is None and stack.gateway is None and len(stack.backends) == 2


def test_gateway_mode_still_binds_the_replicas_to_loopback(paths):
    settings = load_settings(paths, {}, {"LLAMA_SERVER_HOST": "0.0.0.0"})
    assert flag_value(backend_command(settings, MODEL), "--host") == "127.0.0.1"


def test_backend_only_allows_replicas_whatever_llama_proxy_enabled_says(paths):
    environ = {"LLAMA_SERVER_REPLICAS": "2", "LLAMA_PROXY_ENABLED": "0"}
    assert len(load_settings(paths, {}, environ, backend_only=True).replicas) == 2


def test_the_mode_is_remembered_until_changed(paths):
    assert not load_settings(paths, {}, {}).is_backend_only
    remember_mode(paths.run_dir, True)
    assert is_remembered_backend_only(paths.run_dir)
    assert load_settings(paths, {}, {}).is_backend_only
    assert not load_settings(paths, {}, {}, backend_only=False).is_backend_only
    remember_mode(paths.run_dir, False)
    assert not load_settings(paths, {}, {}).is_backend_only


def test_backend_only_with_no_replica_is_refused(paths):
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, {"LLAMA_SERVER_REPLICAS": "0"}, backend_only=True)
    message = str(error.value)
    assert (
        "--backend-only" in message and "LLAMA_SERVER_REPLICAS=0 (from the environment)" in message
    )
    assert "set LLAMA_SERVER_REPLICAS to 1 or more" in message


def test_no_replica_in_single_key_mode_is_refused(paths):
    environ = {"LLAMA_SERVER_REPLICAS": "0", "LLAMA_PROXY_ENABLED": "0"}
    with pytest.raises(ConfigError, match="LLAMA_PROXY_ENABLED=1 for a gateway-only host"):
        load_settings(paths, {}, environ)


def test_a_gateway_only_host_runs_the_database_and_the_gateway_with_no_backend_url(paths):
    settings = load_settings(paths, {}, {"LLAMA_SERVER_REPLICAS": "0", "LLAMA_API_KEY": ""})
    assert settings.replicas == () and settings.backend_urls == "" and settings.backend_url == ""
    assert settings.mode_name.startswith("gateway only")
    stack = Stack(settings)
    assert stack.backends == [] and stack.backend is None
    assert stack.database is not None and stack.gateway is not None
    assert GatewaySupervisor(settings).environment()[BACKEND_URL_KEY] == ""
    # No model to load and no backend to key: neither is asked for.
    assert check_ready_to_start(settings) is None


def test_backend_only_prints_one_add_backend_per_replica_and_never_the_key(paths):
    environ = {
        "LLAMA_SERVER_HOST": "0.0.0.0",
        "LLAMA_SERVER_REPLICAS": "2",
        "LLAMA_SERVER_PORT": "9000",
        "LLAMA_API_KEY": KEY,
    }
    settings = load_settings(paths, {}, environ, backend_only=True)
    lines = registration_lines(settings, hostname="gpu1.lan")
    text = "\n".join(lines)
    assert KEY not in text
    assert "LLAMA_API_KEY, from the environment" in lines[0]
    for port, name in ((9000, "gpu1-backend"), (9001, "gpu1-backend-1")):
        assert (
            f"./bin/user_management_cli.sh add-backend http://gpu1.lan:{port} --name {name} "
            f"--concurrency 1 --key-file FILE"
        ) in text
    assert loopback_warning(settings) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_backend_only_on_loopback_warns_that_other_hosts_cannot_reach_it(paths, host):
    settings = load_settings(paths, {}, {"LLAMA_SERVER_HOST": host}, backend_only=True)
    warning = loopback_warning(settings)
    assert warning is not None
    assert f"LLAMA_SERVER_HOST={host}" in warning and "cannot reach" in warning
    assert f"http://{host if host != '::1' else '[::1]'}:8000" in "\n".join(
        registration_lines(settings)
    )
    assert loopback_warning(load_settings(paths, {}, {"LLAMA_SERVER_HOST": host})) is None
