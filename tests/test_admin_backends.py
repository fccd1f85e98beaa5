"""The admin CLI's backend commands (proxy/adminbackends.py, proxy/backendstore.py) through
click's CliRunner, against a real PostgreSQL; the members are a tiny OpenAI-style server
in a thread, and one accepted registration is checked against the real llama_cpp.server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web
from click.testing import CliRunner, Result
from conftest import TEST_API_KEY, ConsoleHome, clean_environ, free_port
from test_admin import NO_DATABASE_ENV, query

from proxy.admin import cli
from proxy.adminbackends import add_backend
from proxy.migrations import migrate
from proxy.sealing import SealingError, unseal
from runtime.bootstrap import ensure_config
from runtime.settings import CODE_DIR, FALLBACK_MODEL_NAME, Paths, load_settings

SECRET = "test-backend-secret-0123456789"
MEMBER_KEY = "member-key-0123456789abcdef"
POOL_MODEL = "pool-model.gguf"
NAME = "gpu-b1"


class Member:
    """An OpenAI-style backend in a thread of its own: /v1/models asks for its key."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.reset()

    def reset(self) -> None:
        self.key = MEMBER_KEY
        self.models = [POOL_MODEL]
        self.authorizations: list[str] = []

    async def list_models(self, request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        self.authorizations.append(authorization)
        if authorization != f"Bearer {self.key}":
            return web.json_response({"error": "invalid key"}, status=401)
        return web.json_response({"object": "list", "data": [{"id": m} for m in self.models]})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response({"openapi": "3.1.0"})

    def serve(self, started: threading.Event) -> None:
        """Serve in this thread's own loop until stop() is called."""

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", self.list_models)
            app.router.add_get("/openapi.json", self.openapi)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
            started.set()
            await self.stopping.wait()
            await runner.cleanup()

        asyncio.run(main())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)


@pytest.fixture(scope="module")
def running_member() -> Iterator[Member]:
    member = Member()
    started = threading.Event()
    thread = threading.Thread(target=member.serve, args=(started,), daemon=True)
    thread.start()
    assert started.wait(10), "the fake member did not start"
    yield member
    member.stop()
    thread.join(10)


@pytest.fixture
def member(running_member: Member) -> Member:
    running_member.reset()
    return running_member


def invoke(dsn: str, *args: str, input: str | None = None, **environ: str | None) -> Result:
    env = {
        **NO_DATABASE_ENV,
        "POSTGRES_AUTH_DSN": dsn,
        "LLAMA_PROXY_BACKEND_SECRET": SECRET,
        "LLAMA_PROXY_MODEL_NAME": POOL_MODEL,
        "LLAMA_PROXY_BACKEND_URL": None,
        **environ,
    }
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False)


def add(dsn: str, url: str, *options: str, key: str = MEMBER_KEY, **environ: str) -> Result:
    return invoke(dsn, "add-backend", url, "--name", NAME, *options, input=key, **environ)


def backends(dsn: str) -> list[dict]:
    return [dict(row) for row in query(dsn, "SELECT * FROM llama_backends ORDER BY name")]


def slots(dsn: str) -> list[tuple[str, int]]:
    rows = query(
        dsn,
        "SELECT b.name, s.slot FROM llama_backend_slots s "
        "JOIN llama_backends b ON b.id = s.backend_id ORDER BY b.name, s.slot",
    )
    return [(row["name"], row["slot"]) for row in rows]


def migrated(dsn: str) -> str:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(run())
    return dsn


def test_add_backend_writes_the_row_and_its_slots_with_the_key_sealed(pg_dsn, member):
    result = add(pg_dsn, member.url + "/", "--concurrency", "3")

    assert result.exit_code == 0, result.output
    assert f"added backend {NAME!r}: {member.url}, 3 slots, serving {POOL_MODEL!r}" in result.stdout
    assert member.authorizations == [f"Bearer {MEMBER_KEY}"]
    [row] = backends(pg_dsn)
    assert (row["name"], row["url"], row["concurrency"]) == (NAME, member.url, 3)
    assert (row["state"], row["problem"], row["model"]) == ("active", "", POOL_MODEL)
    assert slots(pg_dsn) == [(NAME, 0), (NAME, 1), (NAME, 2)]
    assert MEMBER_KEY not in json.dumps(row, default=str)
    assert unseal(SECRET, NAME, row["url"], row["sealed_key"]) == MEMBER_KEY


def test_a_sealed_key_does_not_open_with_another_secret_on_another_row_or_url(pg_dsn, member):
    assert add(pg_dsn, member.url).exit_code == 0
    [row] = backends(pg_dsn)
    with pytest.raises(SealingError, match="differs from the one it was added with"):
        unseal("another-secret", NAME, row["url"], row["sealed_key"])
    with pytest.raises(SealingError):
        unseal(SECRET, "another-name", row["url"], row["sealed_key"])
    # Write access to the row cannot point the member's key at a host of the attacker's.
    with pytest.raises(SealingError, match="its name or URL was changed"):
        unseal(SECRET, NAME, "http://attacker.example:8000", row["sealed_key"])


def test_add_backend_reads_the_key_from_a_file(pg_dsn, member, tmp_path: Path):
    key_file = tmp_path / "member.key"
    key_file.write_text(MEMBER_KEY + "\n")
    result = invoke(pg_dsn, "add-backend", member.url, "--name", NAME, "--key-file", str(key_file))

    assert result.exit_code == 0, result.output
    assert unseal(SECRET, NAME, member.url, backends(pg_dsn)[0]["sealed_key"]) == MEMBER_KEY


def test_add_backend_takes_no_key_on_the_command_line(pg_dsn, member):
    assert not [p for p in add_backend.params if "key" in p.name and p.name != "key_file"]
    result = invoke(migrated(pg_dsn), "add-backend", member.url, "--name", NAME, "--key", "k")
    assert result.exit_code == 2
    assert "No such option '--key'" in result.output
    assert backends(pg_dsn) == []


def test_add_backend_accepts_a_model_id_that_is_a_path_to_the_pools_model(pg_dsn, member):
    member.models = ["other.gguf", f"/srv/models/{POOL_MODEL}"]
    result = add(pg_dsn, member.url)
    assert result.exit_code == 0, result.output
    assert backends(pg_dsn)[0]["model"] == f"/srv/models/{POOL_MODEL}"


def refusal(pg_dsn: str, result: Result, *phrases: str, exit_code: int = 2) -> None:
    """The command failed with a message naming the problem, and changed no table."""
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert backends(pg_dsn) == [] and slots(pg_dsn) == []


def test_add_backend_refuses_a_wrong_key_and_writes_nothing(pg_dsn, member):
    result = add(migrated(pg_dsn), member.url, key="not-the-key")
    refusal(pg_dsn, result, "refused the key (HTTP 401)", "LLAMA_API_KEY")


def test_add_backend_refuses_a_member_serving_another_model(pg_dsn, member):
    member.models = ["/srv/models/other.gguf"]
    result = add(migrated(pg_dsn), member.url)
    refusal(pg_dsn, result, "serves '/srv/models/other.gguf', not the pool's model", POOL_MODEL)


def test_add_backend_refuses_an_unreachable_member(pg_dsn):
    url = f"http://127.0.0.1:{free_port()}"
    result = add(migrated(pg_dsn), url)
    refusal(pg_dsn, result, f"cannot reach {url}/v1/models", "LLAMA_SERVER_HOST", exit_code=1)


def test_add_backend_refuses_an_empty_key(pg_dsn, member):
    result = add(migrated(pg_dsn), member.url, key="  \n")
    refusal(pg_dsn, result, "the backend's key is empty", "--key-file")
    assert member.authorizations == []


def test_add_backend_without_a_secret_says_how_to_get_one(pg_dsn, member):
    result = add(migrated(pg_dsn), member.url, LLAMA_PROXY_BACKEND_SECRET="")
    refusal(pg_dsn, result, "LLAMA_PROXY_BACKEND_SECRET is empty", "./console.sh start")
    assert member.authorizations == []


def test_add_backend_without_the_pools_model_name_refuses(pg_dsn, member):
    result = add(migrated(pg_dsn), member.url, LLAMA_PROXY_MODEL_NAME="")
    refusal(pg_dsn, result, "pool's model name is unknown", "bin/user_management_cli.sh")


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["ftp://10.0.0.2:8000"], "invalid backend URL 'ftp://10.0.0.2:8000'"),
        (["http://a:1,http://b:2"], "add one backend at a time"),
        (["http://10.0.0.2:8000?x=1"], "has a query"),
        (["--name", "gpu b1"], "invalid name 'gpu b1'"),
        (["--name", "x" * 64], "1 to 63 letters"),
        (["--concurrency", "0"], "Invalid value for '--concurrency'"),
        (["--concurrency", "two"], "Invalid value for '--concurrency'"),
    ],
)
def test_add_backend_refuses_bad_input_and_writes_nothing(pg_dsn, member, args, phrase):
    url = args.pop(0) if not args[0].startswith("--") else member.url
    result = invoke(migrated(pg_dsn), "add-backend", url, "--name", NAME, *args, input=MEMBER_KEY)
    refusal(pg_dsn, result, phrase)
    assert member.authorizations == []


def test_add_backend_refuses_a_taken_name_or_url_and_changes_nothing(pg_dsn, member):
    assert add(pg_dsn, member.url, "--concurrency", "2").exit_code == 0
    before = (backends(pg_dsn), slots(pg_dsn))
    other_url = f"http://localhost:{member.port}"

    same_name = add(pg_dsn, other_url)
    same_url = invoke(pg_dsn, "add-backend", member.url, "--name", "gpu-b2", input=MEMBER_KEY)

    assert same_name.exit_code == 2 and f"a backend named {NAME!r} exists" in same_name.stderr
    assert same_url.exit_code == 2
    assert f"{member.url} is registered already, as {NAME!r}" in same_url.stderr
    assert (backends(pg_dsn), slots(pg_dsn)) == before
    assert len(member.authorizations) == 1  # a taken name is refused before the member is asked


def test_add_backend_refuses_this_hosts_own_replica(pg_dsn, member):
    result = add(migrated(pg_dsn), member.url, LLAMA_PROXY_BACKEND_URL=member.url)
    refusal(pg_dsn, result, "is one of this host's replicas")


def seed_figures(dsn: str) -> None:
    """Slot figures as gateways leave them: one slot held by a live gateway, one by a dead one."""
    query(
        dsn,
        """
        WITH g AS (
            INSERT INTO llama_gateways (gateway_id, last_seen) VALUES
                ('live', now()), ('dead', now() - interval '1 minute')
        )
        UPDATE llama_backend_slots s
        SET gateway_id = CASE s.slot WHEN 0 THEN 'live' WHEN 1 THEN 'dead' END,
            requests = 10 + s.slot, errors = s.slot,
            last_used = timestamptz '2026-11-30 12:00:00+00' + s.slot * interval '1 minute'
        FROM llama_backends b
        WHERE b.id = s.backend_id AND b.name = $1
        """,
        NAME,
    )


def test_list_backends_shows_state_busy_slots_figures_and_local_replicas(pg_dsn, member):
    assert add(pg_dsn, member.url, "--concurrency", "3").exit_code == 0
    seed_figures(pg_dsn)
    dead_local = f"http://127.0.0.1:{free_port()}"
    local = f"http://localhost:{member.port},{dead_local}"

    table = invoke(pg_dsn, "list-backends", LLAMA_PROXY_BACKEND_URL=local)
    listed = invoke(pg_dsn, "list-backends", "--json", LLAMA_PROXY_BACKEND_URL=local)

    assert table.exit_code == 0, table.output
    header, shared, up_local, down_local = table.stdout.splitlines()
    assert header.split()[:5] == ["NAME", "URL", "STATE", "UP", "BUSY"]
    assert shared.split()[:7] == [NAME, member.url, "active", "up", "1/3", "33", "3"]
    assert "2026-11-30 12:02:00 UTC" in shared and POOL_MODEL in shared
    assert up_local.split()[:4] == ["local", f"http://localhost:{member.port}", "local", "up"]
    assert down_local.split()[:4] == ["local", dead_local, "local", "down"]
    records = json.loads(listed.stdout)
    assert records[0] == {
        "name": NAME,
        "url": member.url,
        "local": False,
        "state": "active",
        "up": True,
        "busy": 1,
        "concurrency": 3,
        "requests": 33,
        "errors": 3,
        "last_used": "2026-11-30T12:02:00+00:00",
        "model": POOL_MODEL,
        "problem": "",
    }
    assert [(r["url"], r["local"], r["up"]) for r in records[1:]] == [
        (f"http://localhost:{member.port}", True, True),
        (dead_local, True, False),
    ]


def test_list_backends_with_no_backend_says_how_to_add_one(pg_dsn):
    result = invoke(pg_dsn, "list-backends")
    assert result.exit_code == 0, result.output
    assert "no backend: add one with add-backend" in result.stdout


def states(dsn: str) -> list[tuple[str, str, str]]:
    return [(row["name"], row["state"], row["problem"]) for row in backends(dsn)]


def test_drain_then_enable_backend_changes_its_state_only(pg_dsn, member):
    assert add(pg_dsn, member.url, "--concurrency", "2").exit_code == 0
    before = backends(pg_dsn)[0]

    drained = invoke(pg_dsn, "drain-backend", NAME)
    assert drained.exit_code == 0, drained.output
    assert f"backend {NAME!r} is draining (was active)" in drained.stdout
    assert states(pg_dsn) == [(NAME, "draining", "")]

    enabled = invoke(pg_dsn, "enable-backend", NAME)
    assert enabled.exit_code == 0, enabled.output
    assert f"backend {NAME!r} is active (was draining)" in enabled.stdout
    after = backends(pg_dsn)[0]
    unchanged = ("url", "concurrency", "sealed_key", "model")
    assert [after[c] for c in unchanged] == [before[c] for c in unchanged]
    assert slots(pg_dsn) == [(NAME, 0), (NAME, 1)]


def test_enable_backend_clears_a_refusal_and_its_problem(pg_dsn, member):
    assert add(pg_dsn, member.url).exit_code == 0
    problem = "serves 'other.gguf', not the pool's model"
    query(pg_dsn, "UPDATE llama_backends SET state = 'refused', problem = $1", problem)
    listed = invoke(pg_dsn, "list-backends")
    assert f"{NAME}: {problem}" in listed.stdout

    enabled = invoke(pg_dsn, "enable-backend", NAME)

    assert enabled.exit_code == 0, enabled.output
    assert "was refused" in enabled.stdout
    assert states(pg_dsn) == [(NAME, "active", "")]


def test_remove_backend_deletes_its_row_and_slots(pg_dsn, member):
    assert add(pg_dsn, member.url, "--concurrency", "2").exit_code == 0
    result = invoke(pg_dsn, "remove-backend", NAME)
    assert result.exit_code == 0, result.output
    assert f"removed backend {NAME!r} ({member.url})" in result.stdout
    assert backends(pg_dsn) == [] and slots(pg_dsn) == []


@pytest.mark.parametrize("command", ["drain-backend", "enable-backend", "remove-backend"])
def test_an_unknown_name_says_where_the_names_are_and_changes_nothing(pg_dsn, member, command):
    assert add(pg_dsn, member.url).exit_code == 0
    before = (backends(pg_dsn), slots(pg_dsn))
    result = invoke(pg_dsn, command, "gpu-zz")
    assert result.exit_code == 2
    assert "no backend named 'gpu-zz': list-backends shows the names" in result.stderr
    assert (backends(pg_dsn), slots(pg_dsn)) == before


def test_a_real_llama_cpp_server_is_accepted_and_a_wrong_key_refused(pg_dsn, serving: ConsoleHome):
    url = f"http://127.0.0.1:{serving.port}"
    model = {"LLAMA_PROXY_MODEL_NAME": FALLBACK_MODEL_NAME}

    wrong = add(migrated(pg_dsn), url, key="not-the-key", **model)
    refusal(pg_dsn, wrong, "refused the key (HTTP 401)")
    accepted = add(pg_dsn, url, key=TEST_API_KEY, **model)

    assert accepted.exit_code == 0, accepted.output
    [row] = backends(pg_dsn)
    assert (row["url"], row["model"]) == (url, FALLBACK_MODEL_NAME)
    assert unseal(SECRET, NAME, row["url"], row["sealed_key"]) == TEST_API_KEY


def test_the_console_hands_the_admin_cli_its_model_name_secret_and_replicas(
    pg_dsn, member, tmp_path: Path
):
    paths = Paths(root=tmp_path / "home")
    ensure_config(paths)
    replica_port = free_port()
    env = {
        **clean_environ(),
        "LLAMAGATE_ROOT": str(paths.root),
        "POSTGRES_AUTH_DSN": pg_dsn,
        "LLAMA_MODEL_ALIAS": POOL_MODEL,
        "LLAMA_SERVER_PORT": str(replica_port),
    }

    def admin(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "runtime.admin", *args]
        return subprocess.run(
            command, cwd=CODE_DIR, env=env, input=MEMBER_KEY, capture_output=True, text=True
        )

    added = admin("add-backend", member.url, "--name", NAME)
    listed = admin("list-backends", "--json")

    assert added.returncode == 0, added.stderr
    secret = load_settings(paths, {}, {})["LLAMA_PROXY_BACKEND_SECRET"]
    assert unseal(secret, NAME, member.url, backends(pg_dsn)[0]["sealed_key"]) == MEMBER_KEY
    records = json.loads(listed.stdout)
    assert [(r["name"], r["url"], r["up"]) for r in records] == [
        (NAME, member.url, True),
        ("local", f"http://127.0.0.1:{replica_port}", False),
    ]
