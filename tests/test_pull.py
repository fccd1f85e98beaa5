"""`pull` runs the real huggingface_hub code path against a local stand-in for the hub.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE when it is
imported, so each pull runs in a subprocess (`python -m runtime pull`) with its own env.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import FakeHub

CODE_DIR = Path(__file__).resolve().parent.parent
REPO = "acme/tiny-GGUF"
TWO_QUANTS = "acme/two-quants-GGUF"
GATED = "acme/members-only-GGUF"
PULL_TIMEOUT_SECONDS = 120


def gguf_payload(tag: str) -> bytes:
    """A few KB that start like a GGUF file and differ per file."""
    return b"GGUF" + tag.encode() + bytes(range(256)) * 16


REPOS = {
    REPO: {"tiny.Q4_K_M.gguf": gguf_payload("tiny"), "README.md": b"# tiny\n"},
    TWO_QUANTS: {
        "two.Q4_K_M.gguf": gguf_payload("q4"),
        "two.Q8_0.gguf": gguf_payload("q8"),
        "config.json": b"{}",
    },
    GATED: {"gated.Q4_0.gguf": gguf_payload("gated")},
}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub(REPOS, gated=frozenset({GATED})).start()
    yield fake
    fake.stop()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL whose port is bound but not listening, so connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def pull_env(root: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """The operator's env without any HF settings, pointed at `endpoint` and a private cache."""
    leaky = ("HF_", "HUGGING", "TRANSFORMERS_", "TQDM_", "LLAMA")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaky)}
    env.update(LLAMAGATE_ROOT=str(root), HF_ENDPOINT=endpoint, HF_HOME=str(root / "hf"), **extra)
    return env


def run_pull(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runtime", "pull", *args],
        cwd=CODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=PULL_TIMEOUT_SECONDS,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_pull_puts_the_file_into_models(tmp_path: Path, hub: FakeHub) -> None:
    result = run_pull(pull_env(tmp_path, hub.url), REPO)

    assert result.returncode == 0, result.stderr
    pulled = tmp_path / "models" / "tiny.Q4_K_M.gguf"
    assert pulled.read_bytes() == REPOS[REPO]["tiny.Q4_K_M.gguf"]
    assert str(pulled) in result.stdout
    # Only the finished file is there: no temporary or partial names left behind.
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny.Q4_K_M.gguf"]
    assert hub.downloads() == [f"/{REPO}/resolve/main/tiny.Q4_K_M.gguf"]


def test_pull_shows_the_download_progress_bar_on_stderr(tmp_path: Path, hub: FakeHub) -> None:
    # tqdm hides bars when stderr is not a tty; TQDM_POSITION=-1 makes huggingface_hub draw them.
    result = run_pull(pull_env(tmp_path, hub.url, TQDM_POSITION="-1"), REPO)

    assert result.returncode == 0, result.stderr
    assert "tiny.Q4_K_M.gguf" in result.stderr and "100%" in result.stderr


def test_pull_sends_hf_token_as_bearer(tmp_path: Path, hub: FakeHub) -> None:
    result = run_pull(pull_env(tmp_path, hub.url, HF_TOKEN="hf_fake_secret"), REPO)

    assert result.returncode == 0, result.stderr
    assert hub.requests, "the fake hub was never called"
    # huggingface_hub may also fetch hub-wide telemetry data; only the repo's calls matter.
    assert {r.authorization for r in hub.requests if REPO in r.path} == {"Bearer hf_fake_secret"}


def test_pull_without_token_sends_no_authorization(tmp_path: Path, hub: FakeHub) -> None:
    result = run_pull(pull_env(tmp_path, hub.url), REPO)

    assert result.returncode == 0, result.stderr
    assert {r.authorization for r in hub.requests if REPO in r.path} == {None}


def test_second_pull_in_offline_mode_uses_the_cache(tmp_path: Path, hub: FakeHub) -> None:
    assert run_pull(pull_env(tmp_path, hub.url), REPO).returncode == 0
    (tmp_path / "models" / "tiny.Q4_K_M.gguf").unlink()
    seen_before = len(hub.requests)

    result = run_pull(pull_env(tmp_path, hub.url, HF_HUB_OFFLINE="1"), REPO)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "tiny.Q4_K_M.gguf").read_bytes() == gguf_payload("tiny")
    assert len(hub.requests) == seen_before, "offline mode must not call the hub"


def test_second_pull_with_the_hub_down_uses_the_cache(tmp_path: Path, hub: FakeHub) -> None:
    assert run_pull(pull_env(tmp_path, hub.url), REPO).returncode == 0
    (tmp_path / "models" / "tiny.Q4_K_M.gguf").unlink()
    hub.stop()

    result = run_pull(pull_env(tmp_path, hub.url), REPO)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "tiny.Q4_K_M.gguf").read_bytes() == gguf_payload("tiny")


def test_unreachable_hub_with_empty_cache_names_the_endpoint(
    tmp_path: Path, refused_url: str
) -> None:
    result = run_pull(pull_env(tmp_path, refused_url), REPO)

    assert result.returncode == 1
    [line] = error_lines(result)
    assert refused_url in line
    assert "HF_ENDPOINT" in line and "HF_HUB_OFFLINE" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_offline_mode_with_empty_cache_says_so(tmp_path: Path, hub: FakeHub) -> None:
    result = run_pull(pull_env(tmp_path, hub.url, HF_HUB_OFFLINE="1"), REPO)

    assert result.returncode == 1
    [line] = error_lines(result)
    assert "HF_HUB_OFFLINE" in line and REPO in line
    assert hub.requests == []


def test_several_matches_without_pattern_are_refused_with_the_list(
    tmp_path: Path, hub: FakeHub
) -> None:
    result = run_pull(pull_env(tmp_path, hub.url), TWO_QUANTS)

    assert result.returncode == 1
    [line] = error_lines(result)
    assert "two.Q4_K_M.gguf" in line and "two.Q8_0.gguf" in line and "PATTERN" in line
    assert hub.downloads() == []


def test_pattern_selects_one_file(tmp_path: Path, hub: FakeHub) -> None:
    result = run_pull(pull_env(tmp_path, hub.url), TWO_QUANTS, "*Q8_0.gguf")

    assert result.returncode == 0, result.stderr
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["two.Q8_0.gguf"]
    assert (tmp_path / "models" / "two.Q8_0.gguf").read_bytes() == gguf_payload("q8")


def test_pattern_matching_nothing_names_repo_and_pattern(tmp_path: Path, hub: FakeHub) -> None:
    result = run_pull(pull_env(tmp_path, hub.url), TWO_QUANTS, "*IQ2_XS.gguf")

    assert result.returncode == 1
    [line] = error_lines(result)
    assert TWO_QUANTS in line and "*IQ2_XS.gguf" in line


def test_unknown_repo_gives_a_clear_error(tmp_path: Path, hub: FakeHub) -> None:
    result = run_pull(pull_env(tmp_path, hub.url), "acme/no-such-repo")

    assert result.returncode == 1
    [line] = error_lines(result)
    assert "acme/no-such-repo" in line and "not found" in line and "HF_TOKEN" in line
    assert "Traceback" not in result.stderr


def test_gated_repo_suggests_hf_token(tmp_path: Path, hub: FakeHub) -> None:
    result = run_pull(pull_env(tmp_path, hub.url), GATED)

    assert result.returncode == 1
    [line] = error_lines(result)
    assert GATED in line and "HF_TOKEN" in line and "accept its terms" in line
