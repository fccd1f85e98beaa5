"""Folding repeated anonymous refusals into one counted request-log row (pure logic)."""

from __future__ import annotations

from datetime import UTC, datetime

from proxy import store
from proxy.refusals import FOLD_SECONDS, RefusalFolder
from proxy.requestlog import RequestRecord

REPEATS = store.REQUEST_COLUMNS.index("repeat_count")


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def row(number: int, status: int, client: str = "10.0.0.1", path: str = "/v1/models", **values):
    record = RequestRecord(
        f"request-{number}", datetime(2026, 1, 1, tzinfo=UTC), "GET", path, client, 0.0, **values
    )
    record.status_code = status
    return record.to_row(0.0)


def test_repeats_within_a_second_become_the_first_row_with_a_count():
    clock = Clock()
    folder = RefusalFolder(clock)
    assert all(folder.absorbs(row(n, 401)) for n in range(5))
    assert folder.due() == []  # held until the second is over
    clock.now += FOLD_SECONDS
    [folded] = folder.due()
    assert folded[0] == "request-0" and folded[REPEATS] == 5
    assert folded[:REPEATS] == row(0, 401)[:REPEATS]
    assert folder.due() == []


def test_refusals_fold_per_client_status_and_route_and_a_lone_one_counts_one():
    folder = RefusalFolder(Clock())
    for number, (status, client, path) in enumerate(
        [
            (401, "10.0.0.1", "/v1/models"),
            (401, "10.0.0.1", "/v1/models"),
            (401, "10.0.0.2", "/v1/models"),
            (401, "10.0.0.1", "/v1/chat/completions"),
            (404, "10.0.0.1", "/a"),
            (404, "10.0.0.1", "/b"),  # unknown routes fold together
        ]
    ):
        assert folder.absorbs(row(number, status, client, path))
    counts = {(r[0], r[REPEATS]) for r in folder.due(is_closing=True)}
    assert counts == {("request-0", 2), ("request-2", 1), ("request-3", 1), ("request-4", 2)}


def test_requests_of_a_user_are_never_folded():
    folder = RefusalFolder(Clock())
    assert not folder.absorbs(row(1, 200, username="alice"))
    assert not folder.absorbs(row(2, 429, username="alice"))
    assert not folder.absorbs(row(3, 400))  # anonymous, but not a refusal of its key or route
    assert folder.due(is_closing=True) == []


def test_a_new_group_starts_once_the_second_is_over():
    clock = Clock()
    folder = RefusalFolder(clock)
    folder.absorbs(row(1, 401))
    clock.now += FOLD_SECONDS
    first = folder.due()
    folder.absorbs(row(2, 401))
    assert [r[REPEATS] for r in first] == [1]
    assert [r[0] for r in folder.due(is_closing=True)] == ["request-2"]
