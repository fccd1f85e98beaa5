"""runtime/replicas.py and the replica keys: ports, threads, GPUs, and the rules across keys.

Pure logic; the console running real replicas is in test_console_replicas.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import load_config
from runtime.backend import backend_command
from runtime.gateway import GatewaySupervisor
from runtime.replicas import index_of_name, indexes_on_disk
from runtime.settings import ConfigError, Paths, load_settings
from runtime.supervisor import BackendSupervisor

MODEL = Path("/models/m.gguf")


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    paths = Paths(root=tmp_path)
    paths.runtime_dir.mkdir()
    return paths


def flag_value(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


@pytest.mark.parametrize(
    ("cores", "replicas", "threads"), [(8, 1, 8), (8, 2, 4), (8, 3, 2), (2, 2, 1), (2, 16, 1)]
)
def test_threads_default_to_the_cores_divided_among_the_replicas(paths, cores, replicas, threads):
    environ = {"LLAMA_SERVER_REPLICAS": str(replicas)}
    settings = load_settings(paths, {}, environ, cpu_count=cores)
    assert settings.server.n_threads == threads
    assert "replica" in settings.source_of("LLAMA_N_THREADS")
    for replica in settings.replicas:
        assert flag_value(backend_command(settings, MODEL, replica), "--n_threads") == str(threads)


def test_an_explicit_thread_count_is_kept_whatever_the_replicas(paths):
    environ = {"LLAMA_SERVER_REPLICAS": "2", "LLAMA_N_THREADS": "3"}
    settings = load_settings(paths, {}, environ, cpu_count=8)
    assert settings.server.n_threads == 3
    assert settings.source_of("LLAMA_N_THREADS") == "environment"
    assert flag_value(backend_command(settings, MODEL, settings.replica(1)), "--n_threads") == "3"


def test_replicas_process_prompts_with_their_own_threads_not_every_core(paths):
    two = load_settings(paths, {}, {"LLAMA_SERVER_REPLICAS": "2"}, cpu_count=8)
    assert flag_value(backend_command(two, MODEL, two.replica(1)), "--n_threads_batch") == "4"
    # One replica keeps llama_cpp.server's default for prompts: every core.
    one = load_settings(paths, {}, {}, cpu_count=8)
    assert flag_value(backend_command(one, MODEL), "--n_threads_batch") is None


def test_replicas_listen_on_consecutive_ports_skipping_the_gateways(paths):
    settings = load_settings(paths, {}, {"LLAMA_SERVER_REPLICAS": "3"})
    # The defaults: backend 8000, gateway 8001.
    assert [replica.port for replica in settings.replicas] == [8000, 8002, 8003]
    assert [replica.name for replica in settings.replicas] == ["backend", "backend-1", "backend-2"]
    commands = [backend_command(settings, MODEL, replica) for replica in settings.replicas]
    assert [flag_value(command, "--port") for command in commands] == ["8000", "8002", "8003"]


def test_the_gateway_gets_every_replica_url_and_one_url_for_one_replica(paths):
    environ = {"LLAMA_SERVER_PORT": "9000", "LLAMA_PROXY_PORT": "9100"}
    for replicas, urls in [
        ("1", "http://127.0.0.1:9000"),
        ("2", "http://127.0.0.1:9000,http://127.0.0.1:9001"),
    ]:
        settings = load_settings(paths, {}, {**environ, "LLAMA_SERVER_REPLICAS": replicas})
        gateway = GatewaySupervisor(settings, dsn="postgresql://x@h/db", environ={})
        assert gateway.environment()["LLAMA_PROXY_BACKEND_URL"] == urls
        assert load_config(gateway.environment()).backend_urls == tuple(urls.split(","))


def test_each_replica_gets_its_own_gpu(paths):
    environ = {"LLAMA_SERVER_REPLICAS": "2", "LLAMA_REPLICA_GPUS": "1, 0"}
    settings = load_settings(paths, {}, environ)
    host_environ = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}
    visible = [
        BackendSupervisor(settings, environ=host_environ, replica=replica).environment()[
            "CUDA_VISIBLE_DEVICES"
        ]
        for replica in settings.replicas
    ]
    assert visible == ["1", "0"]


def test_without_a_gpu_list_replicas_see_the_environments_gpus(paths):
    settings = load_settings(paths, {}, {"LLAMA_SERVER_REPLICAS": "2"})
    host_environ = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}
    backend = BackendSupervisor(settings, environ=host_environ, replica=settings.replica(1))
    assert backend.environment()["CUDA_VISIBLE_DEVICES"] == "0,1"


@pytest.mark.parametrize(("replicas", "gpus"), [("2", "0"), ("1", "0,1"), ("3", "0,1")])
def test_a_gpu_list_that_does_not_match_the_replicas_is_refused(paths, replicas, gpus):
    paths.config_env.write_text(f"LLAMA_REPLICA_GPUS={gpus}\n")
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, {"LLAMA_SERVER_REPLICAS": replicas})
    message = str(error.value)
    assert f"LLAMA_REPLICA_GPUS={gpus}" in message and str(paths.config_env) in message
    assert f"LLAMA_SERVER_REPLICAS={replicas} (from the environment)" in message
    assert "one GPU per replica" in message


def test_a_malformed_gpu_list_is_refused(paths):
    with pytest.raises(ConfigError, match="LLAMA_REPLICA_GPUS='0,,1'.*separated by commas"):
        load_settings(paths, {}, {"LLAMA_SERVER_REPLICAS": "3", "LLAMA_REPLICA_GPUS": "0,,1"})


def test_replica_ports_beyond_65535_are_refused(paths):
    environ = {"LLAMA_SERVER_PORT": "65534", "LLAMA_SERVER_REPLICAS": "3"}
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, environ)
    message = str(error.value)
    assert "65534 to 65536" in message and "LLAMA_SERVER_PORT=65534" in message
    assert "lower LLAMA_SERVER_PORT or LLAMA_SERVER_REPLICAS" in message
    assert load_settings(paths, {}, {**environ, "LLAMA_SERVER_REPLICAS": "2"}).replicas


@pytest.mark.parametrize("replicas", ["-1", "two"])
def test_a_replica_count_below_zero_is_refused(paths, replicas):
    with pytest.raises(ConfigError, match=f"LLAMA_SERVER_REPLICAS='{replicas}'"):
        load_settings(paths, {}, {"LLAMA_SERVER_REPLICAS": replicas})


def test_replicas_in_single_key_mode_are_refused(paths):
    environ = {"LLAMA_SERVER_REPLICAS": "2", "LLAMA_PROXY_ENABLED": "0"}
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, environ)
    assert "single-key mode" in str(error.value)
    assert "set LLAMA_SERVER_REPLICAS=1, or LLAMA_PROXY_ENABLED=1" in str(error.value)


def test_a_lenient_load_of_a_refused_combination_falls_back_to_one_replica(paths):
    environ = {"LLAMA_SERVER_REPLICAS": "2", "LLAMA_PROXY_ENABLED": "0"}
    settings = load_settings(paths, {}, environ, is_strict=False)
    assert [replica.name for replica in settings.replicas] == ["backend"]


def test_pid_files_name_their_replicas(tmp_path):
    for name in ("backend.pid", "backend-1.pid", "backend-12.pid", "proxy.pid", "backend-x.pid"):
        (tmp_path / name).write_text("{}")
    assert indexes_on_disk(tmp_path) == [0, 1, 12]
    assert [index_of_name(stem) for stem in ("backend", "backend-3", "backends")] == [0, 3, None]
