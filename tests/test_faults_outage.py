"""Faults around the gateway's database: an outage during traffic, a spool it cannot write.

The database is a real PostgreSQL cluster of this module's own, so that a test can stop
and start it without disturbing the session's cluster under other tests. The gateway runs
in process, in front of the fake upstream. Faults of whole processes (kill -9, cron runs)
are in test_faults.py; SIGTERM during streams in test_faults_sigterm.py.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from conftest import free_port
from gatewayhelpers import (
    add_user,
    bearer,
    chat,
    gateway_config,
    wait_until,
)
from gatewayprocess import start_gateway_process

from proxy import appkeys, requestlog, store
from proxy.app import make_app
from proxy.chargespool import charge_spool_path
from proxy.requestlog import RequestLog, RequestRecord
from proxy.spool import Spool, append_lines

pytest_plugins = ["gatewayfixture", "outagefixture"]

# Long enough to cover stopping the cluster on a loaded machine (up to ~3 s seen) plus the
# listener's 2 s between confirmed contacts, from which the grace counts.
OUTAGE_GRACE_SECONDS = 8.0
CREATED_AT = datetime(2026, 1, 1, tzinfo=UTC)
DEADLINE = 20.0  # generous: 2 shared cores; only there to turn a hang into a failure


@pytest_asyncio.fixture
async def outage_gateway(own_dsn, aiohttp_client, upstream_server, tmp_path):
    """Start a gateway on the module's cluster (with config overrides)."""

    async def start(**overrides):
        url = str(upstream_server.make_url("")).rstrip("/")
        config = gateway_config(own_dsn, url, tmp_path, **overrides)
        return await aiohttp_client(make_app(config))

    return start


async def execute(dsn: str, sql: str, *args) -> None:
    """One statement on a connection of its own, as psql or the admin CLI would."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def new_key(dsn: str, username: str) -> str:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
    try:
        return await add_user(pool, username)
    finally:
        await pool.close()


async def logged_ids(dsn: str) -> set[str]:
    """request_ids in llama_requests; empty while the database is down."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return set()
    try:
        return {row[0] for row in await conn.fetch("SELECT request_id FROM llama_requests")}
    finally:
        await conn.close()


async def ask(gateway, key: str) -> tuple[int, str]:
    """One chat completion; its status and X-Request-Id."""
    response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    await response.read()
    return response.status, response.headers["X-Request-Id"]


async def in_thread(function) -> None:
    """pg_ctl blocks; keep the gateway's event loop turning meanwhile."""
    await asyncio.to_thread(function)


# --- PostgreSQL stopped and started during traffic -------------------------------------


class Traffic:
    """One user's steady requests through an outage: every status and request id."""

    def __init__(self, gateway, key: str) -> None:
        self.gateway, self.key = gateway, key
        self.sent: dict[str, int] = {}
        self.is_done = False

    async def run(self) -> None:
        while not self.is_done:
            status, request_id = await ask(self.gateway, self.key)
            self.sent[request_id] = status
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
async def test_database_outage_keeps_cached_keys_for_the_grace_only_and_loses_no_row(
    outage_gateway, own_dsn, own_cluster
):
    gateway = await outage_gateway(
        auth_outage_grace_seconds=OUTAGE_GRACE_SECONDS, rate_limit=100_000
    )
    keys = {name: await new_key(own_dsn, name) for name in ("alice", "bob", "carol", "dave")}
    cache = gateway.app[appkeys.AUTHENTICATOR].cache
    await wait_until(lambda: cache.is_listening, "the auth listener")
    for name in ("alice", "bob", "carol"):  # checked, so cached as valid; dave never calls
        assert (await ask(gateway, keys[name]))[0] == 200
    await revoke_and_wait_for_the_notification(own_dsn, cache, keys["bob"], keys["carol"])
    # Cached again after the revocation: alice as valid, bob as revoked; carol not at all.
    assert [(await ask(gateway, keys[name]))[0] for name in ("alice", "bob")] == [200, 401]
    traffic = Traffic(gateway, keys["alice"])
    sender = asyncio.create_task(traffic.run())
    await in_thread(own_cluster.stop)
    outage_started = time.monotonic()
    statuses = {name: (await ask(gateway, keys[name]))[0] for name in keys}
    assert statuses == {"alice": 200, "bob": 401, "carol": 503, "dave": 503}
    # Past the grace, even alice's cached key gets 503 until the database returns.
    await asyncio.sleep(OUTAGE_GRACE_SECONDS - (time.monotonic() - outage_started) + 0.3)
    assert (await ask(gateway, keys["alice"]))[0] == 503
    await in_thread(own_cluster.start)
    await wait_until(lambda: _served_after(traffic), "alice to be served again", DEADLINE)
    traffic.is_done = True
    await sender
    assert set(traffic.sent.values()) <= {200, 503}, traffic.sent
    statuses = {name: (await ask(gateway, keys[name]))[0] for name in keys}
    assert statuses == {"alice": 200, "bob": 401, "carol": 401, "dave": 200}
    every_id = set(traffic.sent)
    await wait_until(
        lambda: _contains(logged_ids(own_dsn), every_id), "every row in llama_requests", DEADLINE
    )


async def revoke_and_wait_for_the_notification(dsn: str, cache, *keys: str) -> None:
    generation = cache.generation
    await execute(
        dsn,
        "UPDATE api_keys SET revoked_at = now() WHERE key_id = ANY($1)",
        [key[4:16] for key in keys],
    )
    await wait_until(lambda: cache.generation > generation, "the revocation's notification")


@pytest.mark.asyncio
async def test_grace_zero_fails_closed_through_a_real_outage(outage_gateway, own_dsn, own_cluster):
    gateway = await outage_gateway(auth_outage_grace_seconds=0.0)
    key = await new_key(own_dsn, "alice")
    cache = gateway.app[appkeys.AUTHENTICATOR].cache
    await wait_until(lambda: cache.is_listening, "the auth listener")
    assert (await ask(gateway, key))[0] == 200  # cached as valid a moment ago
    await in_thread(own_cluster.stop)
    await wait_until(lambda: not cache.is_listening, "the listener to see the outage", DEADLINE)
    response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert response.status == 503
    assert (await response.json())["error"]["code"] == "db_down"
    await in_thread(own_cluster.start)
    await wait_until(
        lambda: _status_is(ask(gateway, key), 200), "alice to be served again", DEADLINE
    )


async def _status_is(asked, status: int) -> bool:
    return (await asked)[0] == status


def _served_after(traffic: Traffic) -> bool:
    statuses = list(traffic.sent.values())
    return 503 in statuses and statuses[-1] == 200


async def _contains(ids, wanted: set[str]) -> bool:
    return wanted <= await ids


# --- the spool's disk refuses writes ----------------------------------------------------


@contextmanager
def unwritable_spool(tmp_path: Path, how: str) -> Iterator[Path]:
    """A spool path whose writes really fail, and the charge spool's beside it: ENOSPC
    (/dev/full) or EROFS (a ro mount)."""
    if how == "disk-full":
        spool = tmp_path / "requests.spool"
        spool.symlink_to("/dev/full")  # writes fail with ENOSPC; no privileges needed
        charge_spool_path(spool).symlink_to("/dev/full")  # the token charges' too
        yield spool
        return
    mount_point = tmp_path / "read-only"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point / "spool" / "requests.spool"
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("how", "reason"),
    [("disk-full", "No space left on device"), ("read-only", "Read-only file system")],
)
async def test_an_unwritable_spool_is_reported_and_its_rows_survive_in_memory(
    outage_gateway, own_dsn, own_cluster, tmp_path, caplog, how, reason
):
    with unwritable_spool(tmp_path, how) as spool_path:
        gateway = await outage_gateway(spool_path=spool_path)
        key = await new_key(own_dsn, "alice")
        assert (await ask(gateway, key))[0] == 200
        await in_thread(own_cluster.stop)
        sent = {(await ask(gateway, key))[1] for _ in range(3)}
        ready = await _wait_for_readyz(gateway, _both_spools_refused)
        assert "cannot write the spool file" in ready["request_log"]
        assert reason in ready["request_log"]
        assert "cannot write the charge spool" in ready["token_charges"]
        assert reason in ready["token_charges"]
        assert any(r.levelno == logging.ERROR and reason in r.getMessage() for r in caplog.records)
        assert (await ask(gateway, key))[0] == 200  # still serving: nothing crashed
        await in_thread(own_cluster.start)
        ready = await _wait_for_readyz(gateway, lambda body: body["ready"])
        assert ready["request_log"] == "ok" and ready["token_charges"] == "ok"
        await wait_until(lambda: _contains(logged_ids(own_dsn), sent), "the kept rows", DEADLINE)


def _both_spools_refused(body: dict) -> bool:
    return body["request_log"] != "ok" and body["token_charges"] != "ok"


async def _wait_for_readyz(gateway, condition) -> dict:
    async def probe() -> dict | None:
        response = await gateway.get("/readyz")
        body = await response.json()
        assert (response.status == 200) == body["ready"]
        return body if condition(body) else None

    return await wait_until(probe, "/readyz", DEADLINE)


class DownDatabase:
    async def insert(self, rows) -> None:
        raise ConnectionRefusedError(111, "Connection refused")


def rows(count: int) -> list[tuple]:
    """Rows as the gateway makes them, with distinct request ids."""
    return [
        RequestRecord(f"request-{number}", CREATED_AT, "POST", "/", None, 0.0).to_row(0.0)
        for number in range(count)
    ]


@pytest.mark.asyncio
async def test_rows_held_in_memory_are_capped_and_the_loss_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(requestlog, "MAX_BUFFERED_ROWS", 5)
    (tmp_path / "a-file").write_text("")
    journal = RequestLog(DownDatabase().insert, Spool(tmp_path / "a-file" / "requests.spool"))
    for row in rows(8):
        journal.add(row)
        await journal.flush()
    assert journal.buffer == rows(8)[3:]  # the newest five; the oldest three are gone
    assert journal.dropped == 3
    assert "3 rows dropped" in journal.problem


@pytest.mark.asyncio
async def test_a_spool_that_cannot_be_read_keeps_the_rows_instead_of_losing_them(tmp_path):
    written: list[tuple] = []

    async def insert(batch) -> None:
        written.extend(batch)

    spool_path = tmp_path / "requests.spool"
    spool_path.mkdir()  # stat says it has bytes, but it cannot be opened as a file
    (spool_path / "filler").write_text("x")
    journal = RequestLog(insert, Spool(spool_path))
    journal.add(rows(1)[0])
    await journal.flush()  # must not raise
    assert journal.buffer == rows(1)
    assert journal.problem and "spool" in journal.problem


@pytest.mark.asyncio
async def test_rows_over_the_spool_cap_are_counted_in_metrics(outage_gateway, own_dsn, own_cluster):
    gateway = await outage_gateway()
    key = await new_key(own_dsn, "alice")
    assert (await ask(gateway, key))[0] == 200  # cached, so served during the outage
    journal = gateway.app[appkeys.REQUEST_LOG]
    await wait_until(lambda: journal.written == 1, "the first row to be written")
    journal.spool.max_bytes = 1  # a spool that is always full
    await in_thread(own_cluster.stop)
    for _ in range(3):
        assert (await ask(gateway, key))[0] == 200

    async def dropped() -> bool:
        text = await (await gateway.get("/metrics")).text()
        return "llamagate_request_log_dropped_rows_total 3.0" in text

    await wait_until(dropped, "3 dropped rows in /metrics", DEADLINE)
    await in_thread(own_cluster.start)


@pytest.mark.asyncio
async def test_parked_and_replayed_charge_batches_are_counted_in_metrics(
    outage_gateway, own_dsn, own_cluster, tmp_path
):
    gateway = await outage_gateway()
    key = await new_key(own_dsn, "alice")
    assert (await ask(gateway, key))[0] == 200  # cached, so served during the outage
    await in_thread(own_cluster.stop)
    for _ in range(2):
        assert (await ask(gateway, key))[0] == 200
    parked = await wait_until(
        lambda: _charge_batches(gateway, "parked"), "a parked batch in /metrics", DEADLINE
    )
    await in_thread(own_cluster.start)

    async def all_replayed() -> bool:
        return await _charge_batches(gateway, "replayed") == await _charge_batches(
            gateway, "parked"
        )

    await wait_until(all_replayed, "every parked batch replayed", DEADLINE)
    assert parked >= 1
    print(f"charge batches parked and replayed: {await _charge_batches(gateway, 'replayed')}")
    assert not charge_spool_path(tmp_path / "requests.spool").exists()


async def _charge_batches(gateway, what: str) -> float:
    """llamagate_token_charge_batches_<what>_total on /metrics (0.0 is falsy: not yet)."""
    text = await (await gateway.get("/metrics")).text()
    prefix = f"llamagate_token_charge_batches_{what}_total "
    [line] = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(line.removeprefix(prefix))


# --- a stalled database: locks held by an open transaction ------------------------------

STALL_TIMEOUT_SECONDS = 0.5


@pytest.mark.asyncio
async def test_a_stalled_database_takes_the_outage_path_instead_of_hanging(outage_gateway, own_dsn):
    gateway = await outage_gateway(
        db_command_timeout_seconds=STALL_TIMEOUT_SECONDS,
        db_acquire_timeout_seconds=STALL_TIMEOUT_SECONDS,
        rate_limit=100_000,
    )
    alice, carol = await new_key(own_dsn, "alice"), await new_key(own_dsn, "carol")
    cache = gateway.app[appkeys.AUTHENTICATOR].cache
    await wait_until(lambda: cache.is_listening, "the auth listener")
    assert (await ask(gateway, alice))[0] == 200  # alice's key is cached from now on
    journal = gateway.app[appkeys.REQUEST_LOG]
    sent: dict[str, int] = {}
    locker = await asyncpg.connect(own_dsn)
    try:
        await locker.execute(
            "BEGIN; LOCK TABLE users, api_keys, rate_windows, llama_requests "
            "IN ACCESS EXCLUSIVE MODE"
        )
        for key in (alice, alice, carol):  # carol's key is not cached: it needs the database
            status, request_id = await asyncio.wait_for(ask(gateway, key), DEADLINE)
            sent[request_id] = status
        assert list(sent.values()) == [200, 200, 503]
        await wait_until(
            lambda: journal.is_database_down and journal.spool.path.exists(),
            "the rows to be spooled",
            DEADLINE,
        )
    finally:
        await locker.close()  # ends the transaction and its locks
    await wait_until(
        lambda: _contains(logged_ids(own_dsn), set(sent)), "the spooled rows", DEADLINE
    )
    assert (await ask(gateway, carol))[0] == 200


@pytest.mark.asyncio
async def test_waiting_for_a_pooled_connection_has_a_deadline(own_dsn):
    pool = await store.create_pool(own_dsn, max_size=1, acquire_timeout=STALL_TIMEOUT_SECONDS)
    try:
        async with pool.acquire():  # the only connection, held as a stuck query would
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.fetchval("SELECT 1"), 10 * STALL_TIMEOUT_SECONDS)
            assert time.monotonic() - started < 5 * STALL_TIMEOUT_SECONDS
    finally:
        await pool.close()


# --- a long outage's spool replayed while the gateway serves ----------------------------

REPLAY_ROWS = 100_000
HEALTHZ_BUDGET_SECONDS = 0.1


@pytest.mark.asyncio
async def test_a_spool_of_100k_rows_replays_exactly_once_while_healthz_stays_fast(
    own_dsn, tmp_path
):
    # A real `python -m proxy`: its event loop and its garbage collector are the ones
    # measured, not those of the test runner (whose heap alone takes ~200 ms to collect).
    spool_path = tmp_path / "spool" / "requests.spool"
    await asyncio.to_thread(write_spool, spool_path, REPLAY_ROWS)
    settings = {
        "LLAMA_PROXY_HOST": "127.0.0.1",
        "LLAMA_PROXY_PORT": str(free_port()),
        "POSTGRES_AUTH_DSN": own_dsn,
        "LLAMA_PROXY_SPOOL_PATH": str(spool_path),
    }
    started = time.monotonic()
    gateway = await start_gateway_process(settings, tmp_path / "proxy.log")
    latencies: list[float] = []
    gc.freeze()  # the test runner's big heap: its collections are not the gateway's time
    try:
        async with aiohttp.ClientSession() as session:
            while spool_path.exists():  # the replay starts at the first flush
                sent = time.perf_counter()
                async with session.get(f"{gateway.url}/healthz") as response:
                    assert response.status == 200
                latencies.append(time.perf_counter() - sent)
                await asyncio.sleep(0.005)
                assert time.monotonic() - started < 60, "the replay took over a minute"
        replay_seconds = time.monotonic() - started
    finally:
        gc.unfreeze()
        gateway.stop()
    counts = await _fetchrow(
        own_dsn,
        "SELECT count(*) AS all_rows, count(DISTINCT request_id) AS distinct_ids "
        "FROM llama_requests WHERE request_id LIKE 'replayed-%'",
    )
    print(
        f"replayed {REPLAY_ROWS} rows in {replay_seconds:.1f}s; /healthz max "
        f"{max(latencies) * 1000:.1f} ms over {len(latencies)} probes"
    )
    assert (counts["all_rows"], counts["distinct_ids"]) == (REPLAY_ROWS, REPLAY_ROWS)
    assert len(latencies) >= 20  # probed throughout, not once at the end
    assert max(latencies) < HEALTHZ_BUDGET_SECONDS


def write_spool(path: Path, count: int) -> None:
    """A spool file of `count` rows, written a slice at a time to keep memory low."""
    for first in range(0, count, 10_000):
        append_lines(
            path,
            [
                RequestRecord(
                    f"replayed-{number}",
                    CREATED_AT,
                    "POST",
                    "/v1/chat/completions",
                    "10.0.0.1",
                    0.0,
                    username="alice",
                    status_code=200,
                ).to_row(0.01)
                for number in range(first, min(first + 10_000, count))
            ],
        )


async def _fetchrow(dsn: str, sql: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(sql)
    finally:
        await conn.close()
