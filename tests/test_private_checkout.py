"""A checkout in a private directory (as /root is on Debian) starts, serves and keeps its users.

The checkout is a copy of this one's files (what a clone holds, with uncommitted edits)
under a new mode-0700 directory, run through its own console.sh and admin script, as an
operator would. It shares this checkout's venv through a symlink, so nothing installs.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from conftest import TEST_API_KEY, clean_environ, free_port, link_or_copy, processes_matching

from runtime.pgcluster import DB_SYSTEM_USER
from runtime.pglocation import OUT_OF_TREE_BASE
from runtime.settings import CODE_DIR, FALLBACK_MODEL_NAME


@dataclass
class Checkout:
    """A checkout of llamagate somewhere else, driven through its shell entrypoints."""

    root: Path
    env: dict[str, str]
    proxy_url: str

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.root / script), *args],
            cwd="/",
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    def ask(self, api_key: str) -> str:
        client = openai.OpenAI(base_url=f"{self.proxy_url}/v1", api_key=api_key, max_retries=0)
        answer = client.completions.create(model="any", prompt="Hi", max_tokens=2)
        return answer.choices[0].text


def copy_checkout(target: Path) -> None:
    """The files a clone of this checkout would hold, as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=CODE_DIR,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = CODE_DIR / name
        if source.is_file():  # a file deleted but not yet committed is listed, and absent
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.fixture
def private_checkout(fallback_model: Path) -> Iterator[Checkout]:
    parent = Path(tempfile.mkdtemp(prefix="lg-private-", dir="/tmp"))
    parent.chmod(0o700)
    root = parent / "llamagate"
    copy_checkout(root)
    (root / "runtime" / ".venv").symlink_to(CODE_DIR / "runtime" / ".venv")
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    proxy_port = free_port()
    env = {
        **clean_environ(),
        "LLAMA_SERVER_PORT": str(free_port()),
        "LLAMA_API_KEY": TEST_API_KEY,
        "LLAMA_STOP_GRACE_SECONDS": "5",
        "LLAMA_PROXY_ENABLED": "1",
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(proxy_port),
    }
    checkout = Checkout(root, env, f"http://127.0.0.1:{proxy_port}")
    try:
        yield checkout
    finally:
        checkout.run("console.sh", "stop")
        link = root / "runtime" / "pgdata"
        if link.is_symlink():
            shutil.rmtree(Path(os.readlink(link)).parent, ignore_errors=True)
        shutil.rmtree(parent, ignore_errors=True)


def test_a_checkout_in_a_private_directory_serves_and_keeps_its_users(private_checkout):
    checkout = private_checkout
    started = checkout.run("console.sh", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    created = checkout.run("bin/user_management_cli.sh", "create-user", "--username", "a")
    assert created.returncode == 0, created.stdout + created.stderr
    key = next(word for word in created.stdout.split() if word.startswith("lgk_"))
    assert checkout.ask(key)

    data_dir = (checkout.root / "runtime" / "pgdata").resolve()
    if os.geteuid() == 0:
        # PostgreSQL's user cannot enter the 0700 parent, so the data lives outside it,
        # in a directory of its own that only that user may enter.
        assert data_dir.parent.parent == OUT_OF_TREE_BASE
        home = data_dir.parent.stat()
        assert stat.S_IMODE(home.st_mode) == 0o700
        assert home.st_uid == pwd.getpwnam(DB_SYSTEM_USER).pw_uid
    info = checkout.run("console.sh", "info")
    assert str(data_dir) in info.stdout

    stopped = checkout.run("console.sh", "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert processes_matching("postgres", str(data_dir)) == []
    restarted = checkout.run("console.sh", "start")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert checkout.ask(key)  # the user, and the key, survived the restart
