"""runtime/settings.py: precedence of the sources, validation, and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.settings import CODE_DIR, KEYS, ConfigError, Paths, load_settings

KEY = "LLAMA_SERVER_PORT"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    paths = Paths(root=tmp_path)
    paths.runtime_dir.mkdir()
    return paths


def write_config_env(paths: Paths, text: str) -> None:
    paths.config_env.write_text(text)


def write_dotenv(paths: Paths, text: str) -> None:
    paths.dotenv.write_text(text)


def test_defaults_apply_when_no_source_sets_a_key(paths):
    settings = load_settings(paths, {}, {})
    assert settings[KEY] == 8000
    assert settings["LLAMA_SERVER_HOST"] == "127.0.0.1"
    assert settings["LLAMA_N_CTX"] is None
    assert settings.source_of(KEY) == "default"


@pytest.mark.parametrize(
    ("layers", "expected_port", "expected_source"),
    [
        ({"config", "dotenv", "environ", "flags"}, 1004, "command-line flag"),
        ({"config", "dotenv", "environ"}, 1003, "environment"),
        ({"config", "dotenv"}, 1002, "dotenv"),
        ({"config"}, 1001, "config"),
        ({"config", "environ"}, 1003, "environment"),
        ({"dotenv", "flags"}, 1004, "command-line flag"),
    ],
)
def test_higher_source_wins_and_is_reported(paths, layers, expected_port, expected_source):
    if "config" in layers:
        write_config_env(paths, f"{KEY}=1001\n")
    if "dotenv" in layers:
        write_dotenv(paths, f"{KEY}=1002\n")
    environ = {KEY: "1003"} if "environ" in layers else {}
    flags = {KEY: "1004"} if "flags" in layers else {}

    settings = load_settings(paths, flags, environ)

    assert settings[KEY] == expected_port
    source_names = {"dotenv": str(paths.dotenv), "config": str(paths.config_env)}
    assert settings.source_of(KEY) == source_names.get(expected_source, expected_source)


def test_keys_are_resolved_independently_across_sources(paths):
    write_config_env(paths, "LLAMA_N_CTX=512\nLLAMA_MODEL=a.gguf\n")
    write_dotenv(paths, "LLAMA_MODEL=b.gguf\n")
    settings = load_settings(paths, {}, {"LLAMA_N_THREADS": "3"})
    assert (settings["LLAMA_N_CTX"], settings["LLAMA_MODEL"], settings["LLAMA_N_THREADS"]) == (
        512,
        "b.gguf",
        3,
    )
    assert settings.source_of("LLAMA_N_CTX") == str(paths.config_env)
    assert settings.source_of("LLAMA_MODEL") == str(paths.dotenv)
    assert settings.source_of("LLAMA_N_THREADS") == "environment"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("LLAMA_SERVER_PORT", "abc"),
        ("LLAMA_SERVER_PORT", "70000"),
        ("LLAMA_SERVER_PORT", "0"),
        ("LLAMA_N_CTX", "x"),
        ("LLAMA_SERVER_HOST", "nohost"),
        ("LLAMA_LOG_BACKUPS", "0"),
        ("LLAMA_START_TIMEOUT_SECONDS", "-1"),
    ],
)
@pytest.mark.parametrize("where", ["config.env", ".env"])
def test_invalid_value_names_the_key_and_its_file(paths, key, value, where):
    file = paths.config_env if where == "config.env" else paths.dotenv
    file.write_text(f"{key}={value}\n")
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, {})
    message = str(error.value)
    assert key in message
    assert str(file) in message
    assert value in message


def test_invalid_value_from_the_environment_says_so(paths):
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, {KEY: "abc"})
    assert KEY in str(error.value) and "environment" in str(error.value)


def test_invalid_value_in_a_lower_source_is_hidden_by_a_valid_higher_one(paths):
    write_config_env(paths, f"{KEY}=abc\n")
    assert load_settings(paths, {}, {KEY: "9000"})[KEY] == 9000


def test_unknown_key_in_config_env_is_refused_naming_key_and_file(paths):
    write_config_env(paths, "LLAMA_SERVER_PORT=8000\nLLAMA_SERVR_HOST=127.0.0.1\n")
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, {})
    assert "LLAMA_SERVR_HOST" in str(error.value)
    assert str(paths.config_env) in str(error.value)


def test_unknown_keys_in_dotenv_and_environment_are_ignored(paths):
    write_dotenv(paths, "POSTGRES_AUTH_HOST=db\nSOMETHING_ELSE=1\nLLAMA_N_CTX=256\n")
    settings = load_settings(paths, {}, {"LLAMA_SERVR_HOST": "x", "PATH": "/bin"})
    assert settings["LLAMA_N_CTX"] == 256
    assert "SOMETHING_ELSE" not in settings.values
    assert "LLAMA_SERVR_HOST" not in settings.values


def test_gateway_mode_is_the_default(paths):
    settings = load_settings(paths, {}, {})
    assert settings["LLAMA_PROXY_ENABLED"] is True
    assert settings.backend_host == "127.0.0.1"


def test_gateway_mode_keeps_the_backend_on_loopback_whatever_the_host_says(paths):
    settings = load_settings(paths, {}, {"LLAMA_SERVER_HOST": "0.0.0.0", KEY: "8123"})
    assert settings.backend_url == "http://127.0.0.1:8123"


@pytest.mark.parametrize("value", ["maybe", "2"])
def test_an_invalid_gateway_switch_names_the_key_and_file(paths, value):
    write_config_env(paths, f"LLAMA_PROXY_ENABLED={value}\n")
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, {})
    assert "LLAMA_PROXY_ENABLED" in str(error.value)
    assert str(paths.config_env) in str(error.value)


def test_single_key_mode_is_accepted(paths):
    settings = load_settings(paths, {}, {"LLAMA_PROXY_ENABLED": "0"})
    assert settings["LLAMA_PROXY_ENABLED"] is False


def test_extra_args_are_split_like_a_shell(paths):
    write_config_env(paths, "LLAMA_EXTRA_ARGS='--n_batch 256 --chat_format \"chat ml\"'\n")
    settings = load_settings(paths, {}, {})
    assert settings["LLAMA_EXTRA_ARGS"] == ("--n_batch", "256", "--chat_format", "chat ml")


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8123"),
        ("127.0.0.1", "http://127.0.0.1:8123"),
        ("localhost", "http://localhost:8123"),
        ("192.168.1.5", "http://192.168.1.5:8123"),
    ],
)
def test_backend_url_reaches_a_wildcard_host_through_loopback(paths, host, url):
    environ = {"LLAMA_SERVER_HOST": host, KEY: "8123", "LLAMA_PROXY_ENABLED": "0"}
    settings = load_settings(paths, {}, environ)
    assert settings.backend_url == url


def test_env_example_lists_every_key():
    text = (CODE_DIR / ".env.example").read_text()
    missing = [key.name for key in KEYS if f"\n{key.name}=" not in text]
    assert missing == []


def test_agents_md_documents_every_key_in_its_tables():
    text = (CODE_DIR / "agents.md").read_text()
    missing = [key.name for key in KEYS if f"\n| `{key.name}` |" not in text]
    assert missing == []


def test_an_invalid_dsn_names_the_key_and_file_but_not_the_password(paths):
    write_dotenv(paths, "POSTGRES_AUTH_DSN=postgresql://gate:sekrit@db:port/llama\n")
    with pytest.raises(ConfigError) as error:
        load_settings(paths, {}, {})
    assert "POSTGRES_AUTH_DSN" in str(error.value) and str(paths.dotenv) in str(error.value)
    assert "sekrit" not in str(error.value)
