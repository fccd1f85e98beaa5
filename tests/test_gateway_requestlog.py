"""The request log: one row per request, token counts, /v1/me, and the spool that loses nothing."""

from __future__ import annotations

import asyncio
from dataclasses import fields
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from gatewayhelpers import DEADLINE, add_user, bearer, chat, log_rows, wait_until

from proxy import appkeys, requestlog, store
from proxy.refusals import FOLD_SECONDS
from proxy.requestlog import PROBE_INTERVAL_SECONDS, RequestLog, RequestRecord
from proxy.spool import Spool

pytest_plugins = ["gatewayfixture"]


def make_record(number: int, **values) -> RequestRecord:
    return RequestRecord(
        request_id=f"request-{number}",
        created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=number),
        method="POST",
        path="/v1/chat/completions",
        client_addr="127.0.0.1",
        started=0.0,
        **values,
    )


def make_rows(count: int) -> list[tuple]:
    return [make_record(n, status_code=200, username="alice").to_row(0.5) for n in range(count)]


async def rows_when(db, count: int) -> list | None:
    """The log rows once there are `count` of them, else None (for wait_until)."""
    rows = await log_rows(db)
    return rows if len(rows) >= count else None


class FakeClock:
    """A monotonic clock the test moves by hand (to reach the next database probe)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def pass_probe_interval(self) -> None:
        self.now += PROBE_INTERVAL_SECONDS


async def spooled(path) -> list[tuple]:
    """The rows in a spool (or .rejected) file, in order."""
    return (await Spool(path).read_chunk(1_000_000)).rows


class FlakyDatabase:
    """An insert function whose outage the test switches on and off; keeps every row given."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.is_down = False

    async def insert(self, rows) -> None:
        if self.is_down:
            raise ConnectionRefusedError(111, "Connection refused")
        self.rows.extend(rows)


# --- RequestRecord and the columns ------------------------------------------------------


def test_to_row_follows_request_columns():
    record = make_record(1, username="alice", key_id="0123456789ab", status_code=201)
    record.started = 10.0
    row = record.to_row(10.25)
    assert len(row) == len(store.REQUEST_COLUMNS)
    named = dict(zip(store.REQUEST_COLUMNS, row, strict=True))
    assert named["request_id"] == "request-1"
    assert named["username"] == "alice"
    assert named["status_code"] == 201
    assert named["duration_ms"] == pytest.approx(250.0)
    assert set(store.REQUEST_COLUMNS) <= {field.name for field in fields(RequestRecord)}


@pytest.mark.asyncio
async def test_row_lands_in_the_right_columns_of_llama_requests(db):
    record = make_record(
        1,
        request_bytes=11,
        username="alice",
        key_id="0123456789ab",
        status_code=201,
        queue_ms=1.5,
        response_bytes=22,
        model="m",
        stream=True,
        prompt_tokens=3,
        completion_tokens=4,
        error="boom",
    )
    row = record.to_row(0.25)
    await store.insert_requests(db, [row])
    stored = await db.fetchrow("SELECT * FROM llama_requests")
    for column, value in zip(store.REQUEST_COLUMNS, row, strict=True):
        assert stored[column] == value, column


@pytest.mark.asyncio
async def test_insert_requests_ignores_a_request_id_it_has_seen(db):
    rows = make_rows(3)
    await store.insert_requests(db, rows[:2])
    await store.insert_requests(db, rows)
    stored = await db.fetch("SELECT request_id FROM llama_requests ORDER BY request_id")
    assert [r["request_id"] for r in stored] == ["request-0", "request-1", "request-2"]


# --- RequestLog and its spool, with an insert function of the test's own -----------------


@pytest.mark.asyncio
async def test_rows_spool_while_the_database_is_down_and_replay_exactly_once(tmp_path):
    database, spool, clock = FlakyDatabase(), Spool(tmp_path / "requests.spool"), FakeClock()
    journal = RequestLog(database.insert, spool, clock=clock)
    rows = make_rows(5)
    database.is_down = True
    for row in rows[:3]:
        journal.add(row)
    await journal.flush()
    assert journal.buffer == [] and await spool.has_rows()
    assert len(spool.path.read_text().splitlines()) == 3
    journal.add(rows[3])
    await journal.flush()  # still down: appended behind the first three
    database.is_down = False
    clock.pass_probe_interval()
    journal.add(rows[4])
    await journal.flush()
    assert database.rows == rows  # in order, each exactly once
    assert not spool.path.exists()
    await journal.flush()
    assert database.rows == rows


@pytest.mark.asyncio
async def test_torn_last_spool_line_is_skipped(tmp_path):
    spool = Spool(tmp_path / "requests.spool")
    rows = make_rows(2)
    assert await spool.append(rows) == 0
    with open(spool.path, "a", encoding="utf-8") as torn:
        torn.write('["request-9", "2026-01-01T00:0')  # the gateway died mid-write
    database = FlakyDatabase()
    await RequestLog(database.insert, spool).flush()
    assert database.rows == rows
    assert not spool.path.exists()


@pytest.mark.asyncio
async def test_close_writes_what_is_buffered(tmp_path):
    database = FlakyDatabase()
    journal = RequestLog(database.insert, Spool(tmp_path / "requests.spool"))
    rows = make_rows(2)
    for row in rows:
        journal.add(row)
    await journal.close()
    assert database.rows == rows


@pytest.mark.asyncio
async def test_close_spools_what_is_buffered_when_the_database_is_down(tmp_path):
    database, spool = FlakyDatabase(), Spool(tmp_path / "requests.spool")
    database.is_down = True
    journal = RequestLog(database.insert, spool)
    rows = make_rows(2)
    for row in rows:
        journal.add(row)
    await journal.close()
    assert await spooled(spool.path) == rows


@pytest.mark.asyncio
async def test_rows_stay_in_memory_when_the_spool_cannot_be_written(tmp_path):
    (tmp_path / "not-a-dir").write_text("")
    database, clock = FlakyDatabase(), FakeClock()
    database.is_down = True
    spool = Spool(tmp_path / "not-a-dir" / "requests.spool")
    journal = RequestLog(database.insert, spool, clock=clock)
    rows = make_rows(2)
    for row in rows:
        journal.add(row)
    await journal.flush()
    assert journal.buffer == rows
    assert journal.spool.error and "spool" in journal.spool.error
    database.is_down = False
    clock.pass_probe_interval()
    await journal.flush()
    assert database.rows == rows and journal.buffer == []


@pytest.mark.asyncio
async def test_rows_the_database_refuses_are_set_aside_without_blocking_later_ones(tmp_path):
    accepted = []

    async def insert(rows) -> None:
        if any(row[0] == "request-0" for row in rows):
            raise asyncpg.exceptions.CheckViolationError("refused")
        accepted.extend(rows)

    journal = RequestLog(insert, Spool(tmp_path / "requests.spool"))
    rows = make_rows(2)
    journal.add(rows[0])
    await journal.flush()
    journal.add(rows[1])
    await journal.flush()
    assert accepted == [rows[1]]
    assert await spooled(tmp_path / "requests.rejected") == [rows[0]]
    assert not await journal.spool.has_rows()


@pytest.mark.asyncio
async def test_replay_cut_short_resumes_after_the_last_committed_chunk(db, tmp_path, monkeypatch):
    monkeypatch.setattr(requestlog, "REPLAY_CHUNK_ROWS", 2)
    spool = Spool(tmp_path / "requests.spool")
    rows = make_rows(5)
    await spool.append(rows)
    sent: list[list[str]] = []

    async def insert(batch) -> None:
        sent.append([row[0] for row in batch])
        if len(sent) == 2:  # the database goes away after the first chunk of the replay
            raise ConnectionResetError(104, "Connection reset by peer")
        await store.insert_requests(db, batch)

    await RequestLog(insert, spool).flush()
    spool.close()
    assert await spool.has_rows()
    assert await db.fetchval("SELECT count(*) FROM llama_requests") == 2
    # A new gateway on the same spool, as after a crash: it resumes at the third row.
    again = Spool(spool.path)
    await RequestLog(insert, again).flush()
    assert sent[2:] == [["request-2", "request-3"], ["request-4"]]
    assert not spool.path.exists() and not again.offset_path.exists()
    stored = await db.fetch("SELECT request_id FROM llama_requests ORDER BY request_id")
    assert [r["request_id"] for r in stored] == [f"request-{n}" for n in range(5)]


@pytest.mark.asyncio
async def test_a_spool_written_by_older_versions_replays_into_the_table(db, tmp_path):
    """Lines exactly as earlier gateways wrote them (json.dumps: ASCII escapes, spaces; the
    oldest without repeat_count) still land, value for value, through today's insert."""
    path = tmp_path / "requests.spool"
    path.write_bytes(
        b'["old-1", "2026-01-01T00:00:01+00:00", "alice", "0123456789ab", "POST", '
        b'"/v1/chat/completions", 200, 12.5, 0.25, 10, 20, "mod\\u00e8le \\\\x00", true, 3, '
        b'4, "127.0.0.1", null]\n'
        b'["old-2", "2026-01-01T09:00:02+09:00", null, null, "GET", "/v1/\\ud83d\\ude00", '
        b'401, 0.5, null, 0, 30, null, null, null, null, "::1", "invalid key", 7]\n'
    )
    await RequestLog(lambda rows: store.insert_requests(db, rows), Spool(path)).flush()
    stored = {row["request_id"]: row for row in await log_rows(db)}
    assert not path.exists()
    first, second = stored["old-1"], stored["old-2"]
    assert first["created_at"] == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert (first["model"], first["stream"], first["repeat_count"]) == ("modèle \\x00", True, 1)
    assert (first["duration_ms"], first["queue_ms"], first["completion_tokens"]) == (12.5, 0.25, 4)
    assert second["created_at"] == datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)
    assert (second["username"], second["path"]) == (None, "/v1/😀")
    assert (second["status_code"], second["repeat_count"], second["error"]) == (
        401,
        7,
        "invalid key",
    )


# --- through the gateway, against the real database -------------------------------------


@pytest.mark.asyncio
async def test_every_request_gets_exactly_one_row(start_gateway, db, upstream, upstream_server):
    gateway = await start_gateway(rate_limit=3)
    alice, bob = await add_user(db, "alice"), await add_user(db, "bob")
    expected: dict[str, tuple[int, str | None]] = {}

    async def send(method: str, path: str, username: str | None, **options) -> None:
        response = await gateway.request(method, path, **options)
        await response.read()
        expected[response.headers["X-Request-Id"]] = (response.status, username)

    await send("POST", "/v1/chat/completions", "alice", json=chat(), headers=bearer(alice))
    await send("POST", "/v1/chat/completions", None, json=chat())
    await send("GET", "/nowhere", None, headers=bearer(alice))
    await send("GET", "/v1/chat/completions", None, headers=bearer(alice))
    big = chat(pad="x" * 20_000)
    await send("POST", "/v1/chat/completions", "alice", json=big, headers=bearer(alice))
    # 499: the client leaves in the middle of a stream.
    upstream.gate = asyncio.Semaphore(0)
    stream = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(alice)
    )
    upstream.allow(1)
    await asyncio.wait_for(stream.content.readuntil(b"\n\n"), DEADLINE)
    stream.close()
    expected[stream.headers["X-Request-Id"]] = (499, "alice")
    await send("POST", "/v1/chat/completions", "alice", json=chat(), headers=bearer(alice))
    await upstream_server.close()  # the backend goes down
    await send("POST", "/v1/chat/completions", "bob", json=chat(), headers=bearer(bob))

    statuses = sorted(status for status, _ in expected.values())
    assert statuses == [200, 401, 404, 405, 413, 429, 499, 502]
    journal = gateway.app[appkeys.REQUEST_LOG]
    await wait_until(lambda: journal.written >= len(expected), "the rows to be written")
    rows = await log_rows(db)
    assert len(rows) == len(expected)
    assert {row["request_id"]: (row["status_code"], row["username"]) for row in rows} == expected
    for row in rows:
        assert row["duration_ms"] >= 0 and row["created_at"] is not None
        assert row["path"] and row["method"]


@pytest.mark.asyncio
async def test_repeated_anonymous_refusals_are_logged_as_counted_rows(gateway, db):
    started = asyncio.get_running_loop().time()
    first_ids = []
    for number in range(30):
        refused = await gateway.post("/v1/chat/completions", json=chat())
        missing = await gateway.get(f"/nowhere-{number}")
        assert (refused.status, missing.status) == (401, 404)
        first_ids += [refused.headers["X-Request-Id"], missing.headers["X-Request-Id"]]
    seconds = asyncio.get_running_loop().time() - started

    async def counted() -> list | None:
        rows = await log_rows(db)
        return rows if sum(row["repeat_count"] for row in rows) == 60 else None

    rows = await wait_until(counted, "60 requests in the log")
    assert {row["status_code"] for row in rows} == {401, 404}
    assert rows[0]["request_id"] in first_ids[:2]  # a group's row is its first request's
    assert len(rows) <= 2 * (int(seconds / FOLD_SECONDS) + 2)  # not one per request


@pytest.mark.asyncio
async def test_token_counts_are_logged_for_answers_and_streams(gateway, db, upstream):
    upstream.chunks = 4
    key = await add_user(db, "alice")
    whole = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    streamed = await gateway.post(
        "/v1/chat/completions", json=chat(stream=True), headers=bearer(key)
    )
    streamed_bytes = await streamed.read()
    rows = await wait_until(lambda: rows_when(db, 2), "both rows")
    by_id = {row["request_id"]: row for row in rows}
    answer = by_id[whole.headers["X-Request-Id"]]
    assert (answer["prompt_tokens"], answer["completion_tokens"]) == (7, 5)
    assert answer["stream"] is False
    stream = by_id[streamed.headers["X-Request-Id"]]
    assert stream["completion_tokens"] == 4
    assert stream["stream"] is True
    assert stream["response_bytes"] == len(streamed_bytes)
    for row in rows:
        assert row["username"] == "alice"
        assert row["key_id"] == key[4:16]
        assert row["model"] == "m"
        assert row["request_bytes"] > 0
        assert row["queue_ms"] is not None
        assert row["client_addr"] == "127.0.0.1"


@pytest.mark.asyncio
async def test_me_shows_the_callers_own_name_and_usage_only(start_gateway, db):
    gateway = await start_gateway(rate_limit=10)
    alice, bob = await add_user(db, "alice"), await add_user(db, "bob")
    await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(alice))
    for _ in range(2):
        await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(bob))
    await wait_until(lambda: rows_when(db, 3), "the rows")
    response = await gateway.get("/v1/me", headers=bearer(alice))
    assert response.status == 200
    body = await response.json()
    assert body["username"] == "alice"
    assert body["key_id"] == alice[4:16]
    assert body["usage_last_24h"] == {"requests": 1, "prompt_tokens": 7, "completion_tokens": 5}
    assert body["rate_limit"]["limit"] == 10
    assert body["rate_limit"]["remaining"] == 9
    assert "bob" not in await response.text()
    refused = await gateway.get("/v1/me")
    assert refused.status == 401
