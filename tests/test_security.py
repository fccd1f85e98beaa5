"""Security properties of the whole stack that no single module's tests can show.

One stack (console, gateway, real backend, database reached through a DSN with a
password) runs for the module. A workload uses every kind of secret: users' keys, a
revoked key, wrong keys, the internal backend key, the metrics token and the database
password. The tests then look for those secrets wherever they must not be: every log
file, every error body, every table. Covered elsewhere and not repeated here: the key
format and the admin CLI storing digests (test_admin.py), refusals of bad headers and of
revoked keys by raw SQL on one and two gateways (test_gateway_auth.py), /v1/me showing the
caller's own usage (test_gateway_requestlog.py; here: attempts to name another user), and
the backend's IPv4 bind address and its refusal of GET /v1/models without its key
(test_gateway_mode.py; here: IPv6 too, a real connection from a non-loopback address, and
the generation route with every wrong key).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from conftest import GatewayHome, clean_environ, free_port, link_or_copy, wait_for
from gatewayhelpers import add_user, bearer, chat, wait_until
from pgfixture import fresh_database

from proxy.keys import generate_key, key_id_of
from runtime.settings import FALLBACK_MODEL_NAME

pytest_plugins = ["gatewayfixture"]

REVOCATION_SECONDS = 1.0


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, kept whole so that its headers and body can be searched."""

    status: int
    headers: str
    text: str


def call(url: str, method: str = "GET", headers: dict | None = None, data: bytes | None = None):
    """One HTTP request; the answer whatever its status."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return Answer(answer.status, str(answer.headers), answer.read().decode())
    except urllib.error.HTTPError as refused:
        return Answer(refused.code, str(refused.headers), refused.read().decode())


def post_json(url: str, body: object, headers: dict | None = None) -> Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return call(url, "POST", {"Content-Type": "application/json", **(headers or {})}, data)


@dataclass
class Stack:
    """The running stack, and every secret it was given or handed out."""

    home: GatewayHome
    db_password: str
    start_output: str = ""
    secrets: dict[str, str] = field(default_factory=dict)
    answers: dict[str, Answer] = field(default_factory=dict)  # failed requests, by case

    @property
    def backend_url(self) -> str:
        return f"http://127.0.0.1:{self.home.port}"


def with_password(dsn: str, password: str) -> str:
    """The cluster's DSN with a password: trust auth ignores it, but it must never show."""
    user, _, rest = dsn.removeprefix("postgresql://").partition("@")
    return f"postgresql://{user}:{password}@{rest}"


def make_home(root: Path, fallback_model: Path, dsn: str, backend_key: str) -> GatewayHome:
    """Like the gateway_home fixture, for a whole module, with secrets of its own."""
    (root / "models").mkdir(parents=True)
    link_or_copy(fallback_model, root / "models" / FALLBACK_MODEL_NAME)
    home = GatewayHome(root=root, port=free_port(), proxy_port=free_port(), dsn=dsn)
    home.env = {
        **clean_environ(),
        "LLAMAGATE_ROOT": str(root),
        "LLAMA_SERVER_PORT": str(home.port),
        "LLAMA_API_KEY": backend_key,
        "LLAMA_STOP_GRACE_SECONDS": "5",
        "LLAMA_PROXY_ENABLED": "1",
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(home.proxy_port),
        "LLAMA_PROXY_RATE_LIMIT": "100000",
        "POSTGRES_AUTH_DSN": dsn,
    }
    return home


@pytest.fixture(scope="module")
def stack(tmp_path_factory, fallback_model, pg_cluster) -> Iterator[Stack]:
    """The started stack, after the workload has run through it."""
    password = "pw-" + secrets.token_urlsafe(16)
    backend_key = "bk-" + secrets.token_urlsafe(24)
    with fresh_database(pg_cluster) as dsn:
        root = tmp_path_factory.mktemp("secure") / "home"
        home = make_home(root, fallback_model, with_password(dsn, password), backend_key)
        home.env["LLAMA_PROXY_METRICS_TOKEN"] = metrics_token = "mt-" + secrets.token_urlsafe(24)
        started = home.run("start")
        try:
            assert started.returncode == 0, started.stdout + started.stderr
            run = Stack(home, password, started.stdout + started.stderr)
            run.secrets.update(
                {"backend key": backend_key, "db password": password, "metrics": metrics_token}
            )
            run_workload(run)
            yield run
        finally:
            home.run("stop", timeout=60)
            for pid in home.backend_pids():
                os.kill(pid, 9)


# --- the workload -------------------------------------------------------------------------

TINY_CHAT = {"model": "any", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def run_workload(run: Stack) -> None:
    """Use each key rightly, then revoke one, then send every kind of wrong request."""
    alice, bob = new_user(run, "alice"), new_user(run, "bob")
    logged = use_keys_rightly(run, alice, bob)
    revoked = run.home.admin("revoke-key", key_id_of(bob))
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    misuse_keys(run, alice, bob)
    # The tests read the request log too: wait until every gateway request is in it.
    logged += len([case for case in run.answers if case.startswith("gateway")])
    wait_for(lambda: asyncio.run(count_logged(run.home.dsn)) >= logged, what="the request log")


async def count_logged(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        # Repeated anonymous refusals share a row (proxy/refusals.py): count requests.
        return await conn.fetchval("SELECT coalesce(sum(repeat_count), 0) FROM llama_requests")
    finally:
        await conn.close()


def new_user(run: Stack, name: str) -> str:
    key = run.home.new_user(name, rate_limit=100000)
    run.secrets[f"{name}'s key"] = key
    # The secret alone, after the public id: half a key in a log is still a leak.
    run.secrets[f"{name}'s secret"] = key.split("_", 2)[2]
    return key


def use_keys_rightly(run: Stack, alice: str, bob: str) -> int:
    """Successful calls with each secret; how many of them the request log keeps."""
    url = run.home.url
    answers = [
        post_json(f"{url}/v1/chat/completions", TINY_CHAT, bearer(alice)),
        post_json(
            f"{url}/v1/chat/completions", {**TINY_CHAT, "stream": True}, {"X-API-Key": alice}
        ),
        post_json(f"{url}/v1/completions", {"prompt": "Hi", "max_tokens": 2}, bearer(bob)),
        call(f"{url}/v1/me", headers=bearer(alice)),
        call(f"{url}/metrics", headers=bearer(run.secrets["metrics"])),
    ]
    assert [answer.status for answer in answers] == [200] * len(answers)
    return len(answers) - 1  # /metrics is a probe, not logged


def misuse_keys(run: Stack, alice: str, bob: str) -> None:
    """Failed requests of every kind, each carrying some secret; their answers are kept."""
    wrong = f"lgk_{key_id_of(alice)}_{secrets.token_urlsafe(32)}"
    unknown = generate_key().secret_key
    run.secrets.update({"wrong secret": wrong, "unknown key": unknown})
    chat_url, backend_chat = (
        f"{run.home.url}/v1/chat/completions",
        f"{run.backend_url}/v1/chat/completions",
    )
    cases = {
        "gateway, revoked key": lambda: post_json(chat_url, TINY_CHAT, bearer(bob)),
        "gateway, wrong secret": lambda: post_json(chat_url, TINY_CHAT, bearer(wrong)),
        "gateway, unknown key": lambda: post_json(chat_url, TINY_CHAT, {"X-API-Key": unknown}),
        "gateway, basic scheme": lambda: post_json(
            chat_url, TINY_CHAT, {"Authorization": f"Basic {alice}"}
        ),
        "gateway, two keys": lambda: post_json(
            chat_url, TINY_CHAT, {**bearer(alice), "X-API-Key": bob}
        ),
        "gateway, key in query": lambda: call(f"{run.home.url}/v1/models?api_key={alice}"),
        "gateway, unknown route": lambda: call(
            f"{run.home.url}/v2/x?api_key={alice}", headers=bearer(alice)
        ),
        "gateway, not json": lambda: post_json(
            chat_url, b'{"key": "' + alice.encode(), bearer(alice)
        ),
        "gateway, wrong method": lambda: call(chat_url, "DELETE", bearer(alice)),
        "backend, no key": lambda: post_json(backend_chat, TINY_CHAT),
        "backend, user key": lambda: post_json(backend_chat, TINY_CHAT, bearer(alice)),
        "backend, wrong key": lambda: post_json(backend_chat, TINY_CHAT, bearer(wrong)),
    }
    for case, send in cases.items():
        run.answers[case] = send()


# --- the backend behind the gateway --------------------------------------------------------

LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1


def listeners_on(port: int) -> list[str]:
    """The local addresses (as /proc/net shows them) of sockets listening on port."""
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


def non_loopback_addresses() -> list[str]:
    """This host's own IPv4 addresses other than loopback, from the kernel's routing table."""
    lines = Path("/proc/net/fib_trie").read_text().splitlines()
    local = {lines[i - 1].split()[-1] for i, line in enumerate(lines) if "/32 host LOCAL" in line}
    return sorted(address for address in local if not address.startswith("127."))


def test_backend_is_closed_to_other_addresses_and_to_every_key_but_the_internal_one(stack):
    port = stack.home.port
    assert listeners_on(port) and set(listeners_on(port)) <= LOOPBACK_HEX
    for address in non_loopback_addresses():  # as another machine would reach it
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=5).close()
    chat_url = f"{stack.backend_url}/v1/chat/completions"
    for name in ("alice's key", "wrong secret", "metrics", "db password"):
        assert post_json(chat_url, TINY_CHAT, bearer(stack.secrets[name])).status == 401, name
    assert post_json(chat_url, TINY_CHAT).status == 401
    assert post_json(chat_url, TINY_CHAT, bearer(stack.secrets["backend key"])).status == 200


# --- revocation, as an operator does it ----------------------------------------------------


class Poller(threading.Thread):
    """Calls the gateway with one key, back to back, noting when each answer came."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(daemon=True)
        self.url, self.key = url, key
        self.answers: list[tuple[float, int]] = []  # (wall-clock time, status)
        self.is_stopping = threading.Event()

    def run(self) -> None:
        while not self.is_stopping.is_set():
            status = call(self.url, headers=bearer(self.key)).status
            self.answers.append((time.time(), status))
            time.sleep(0.005)  # pacing, not waiting: spares the shared CPU and the rate limit

    def first_refusal(self) -> float | None:
        return next((at for at, status in self.answers if status == 401), None)


async def revoked_at(dsn: str, key_id: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        return (
            await conn.fetchval("SELECT revoked_at FROM api_keys WHERE key_id = $1", key_id)
        ).timestamp()
    finally:
        await conn.close()


def test_a_key_revoked_with_the_admin_cli_is_refused_within_one_second(stack: Stack):
    key = new_user(stack, "carol")
    url = f"{stack.home.url}/v1/models"
    assert call(url, headers=bearer(key)).status == 200  # now in the gateway's auth cache
    poller = Poller(url, key)
    poller.start()
    try:
        revoked = stack.home.admin("revoke-key", key_id_of(key))
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        refused = wait_for(poller.first_refusal, timeout=30, what="the revoked key's refusal")
    finally:
        poller.is_stopping.set()
        poller.join()
    # revoked_at is the start of the revoking transaction: no later than its commit, so
    # this overstates the delay, never understates it.
    latency = refused - asyncio.run(revoked_at(stack.home.dsn, key_id_of(key)))
    print(f"\nrevocation: refused {latency * 1000:.0f} ms after the revoke")
    assert latency < REVOCATION_SECONDS
    assert {status for at, status in poller.answers if at >= refused} == {401}


# The end-of-text tokens of the fallback model (<|endoftext|>, <|im_end|>), banned so that it
# generates for as long as max_tokens allows: long enough to be revoked mid-stream.
ENDLESS = {"logit_bias": {"0": -100, "2": -100}, "max_tokens": 4000, "stream": True}


def test_a_stream_whose_key_is_revoked_with_the_admin_cli_ends_within_one_second(stack: Stack):
    key = new_user(stack, "dave")
    request = urllib.request.Request(
        f"{stack.home.url}/v1/completions",
        data=json.dumps({"prompt": "1, 2, 3,", **ENDLESS}).encode(),
        headers={"Content-Type": "application/json", **bearer(key)},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.readline().startswith(b"data: {")  # the model is generating
        revoked = stack.home.admin("revoke-key", key_id_of(key))
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr
        events = [line for line in answer if line.startswith(b"data: ")]  # to the end
        ended = time.time()
    assert events[-1] != b"data: [DONE]\n", "the stream ran to its end: it was not ended"
    last = json.loads(events[-1].removeprefix(b"data: "))
    assert last["error"]["message"].startswith(f"key_revoked: API key {key_id_of(key)} ")
    latency = ended - asyncio.run(revoked_at(stack.home.dsn, key_id_of(key)))
    print(f"\nrevocation: the real model's stream ended {latency * 1000:.0f} ms after the revoke")
    assert latency < REVOCATION_SECONDS


# --- /v1/me answers for the key's own user, whatever else the request says ------------------

# Ways a caller might try to name another user; none may be honoured.
ME_ATTEMPTS = [
    ("/v1/me?user=bob", {}),
    ("/v1/me?username=bob&key_id={bob_id}", {}),
    ("/v1/me/bob", {}),
    ("/v1/me", {"X-User": "bob", "X-Username": "bob", "X-Forwarded-User": "bob"}),
    ("/v1/me", {"X-Remote-User": "bob", "Forwarded": "for=bob"}),
]


@pytest.mark.asyncio
async def test_a_users_key_cannot_read_another_users_usage_through_me(gateway, db):
    alice, bob = await add_user(db, "alice"), await add_user(db, "bob")
    for key in (alice, bob, bob, bob):
        await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    await wait_until(lambda: _logged(db, 4), "the rows")
    own = await (await gateway.get("/v1/me", headers=bearer(bob))).json()
    assert (own["username"], own["usage_last_24h"]["requests"]) == ("bob", 3)
    for path, headers in ME_ATTEMPTS:
        path = path.format(bob_id=key_id_of(bob))
        response = await gateway.get(path, headers={**bearer(alice), **headers})
        if response.status == 404:  # no such route: nothing of anyone's is shown
            continue
        body = await response.json()
        assert response.status == 200, (path, body)
        assert (body["username"], body["key_id"]) == ("alice", key_id_of(alice)), path
        assert body["usage_last_24h"]["requests"] == 1, path


async def _logged(db: asyncpg.Pool, count: int) -> bool:
    return await db.fetchval("SELECT count(*) FROM llama_requests") >= count


# --- where secrets must never be -----------------------------------------------------------


def leaks_in(text: str | bytes, secrets_by_name: dict[str, str]) -> list[str]:
    """The names of the secrets that occur in text."""
    data = text.encode() if isinstance(text, str) else text
    return [name for name, secret in secrets_by_name.items() if secret.encode() in data]


def test_no_secret_appears_in_any_error_body(stack: Stack):
    refused = {case: answer.status >= 400 for case, answer in stack.answers.items()}
    assert len(refused) >= 10 and all(refused.values()), refused
    leaks = {
        case: found
        for case, answer in stack.answers.items()
        if (found := leaks_in(answer.text + answer.headers, stack.secrets))
    }
    assert leaks == {}


def log_files(stack: Stack, pg_log: Path) -> list[Path]:
    """Every file the console, the gateway, the backend and the database log to."""
    runtime_dir = stack.home.root / "runtime"
    found = [path for path in (runtime_dir / "logs").rglob("*") if path.is_file()]
    found += [path for path in runtime_dir.rglob("*.spool*") if path.is_file()]
    return [*found, pg_log]


def test_no_secret_appears_in_any_log_file(stack: Stack, pg_cluster):
    files = log_files(stack, pg_cluster.log_path)
    names = {path.name for path in files}
    assert {"backend.log", "proxy.log"} <= names, names
    leaks = {
        str(path): found for path in files if (found := leaks_in(path.read_bytes(), stack.secrets))
    }
    if found := leaks_in(stack.start_output, stack.secrets):
        leaks["./console.sh start"] = found
    assert leaks == {}


async def every_stored_value(dsn: str) -> list[object]:
    """Every value in every table of the database, whatever its type."""
    conn = await asyncpg.connect(dsn)
    try:
        tables = await conn.fetch(
            "SELECT quote_ident(table_name) AS name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
        )
        values: list[object] = []
        for table in tables:
            for row in await conn.fetch(f"SELECT * FROM {table['name']}"):
                values.extend(row.values())
        return values
    finally:
        await conn.close()


def as_bytes(value: object) -> bytes:
    return bytes(value) if isinstance(value, bytes | memoryview) else str(value).encode()


def test_keys_are_stored_only_as_digests_in_every_table(stack: Stack):
    values = asyncio.run(every_stored_value(stack.home.dsn))
    stored = b"\0".join(as_bytes(value) for value in values)
    assert leaks_in(stored, stack.secrets) == []
    # And the digests are there: the search above did look where the keys are kept.
    for name in ("alice", "bob"):
        digest = hashlib.sha256(stack.secrets[f"{name}'s key"].encode()).digest()
        assert digest in values, name
