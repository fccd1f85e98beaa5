"""/metrics: token counters per user, with the same bounded user labels as the requests."""

from __future__ import annotations

import pytest
from gatewayhelpers import add_user, bearer, chat

from proxy.metrics import MAX_USER_LABELS, OTHER_USERS, Metrics
from proxy.queue import QueueStats

pytest_plugins = ["gatewayfixture"]


def idle() -> QueueStats:
    return QueueStats(active=0, waiting=0, waiting_by_user={})


def tokens_line(user: str, kind: str, value: float) -> str:
    return f'llamagate_tokens_total{{kind="{kind}",user="{user}"}} {value}'


def test_prompt_and_completion_tokens_add_up_per_user():
    metrics = Metrics(idle)
    metrics.observe("/v1/chat/completions", 200, "alice", 0.1, 7, 5)
    metrics.observe("/v1/chat/completions", 200, "alice", 0.1, 3, 2)
    metrics.observe("/v1/completions", 200, "bob", 0.1, 11, None)  # a stream without usage

    text = metrics.render().decode()

    assert tokens_line("alice", "prompt", 10.0) in text
    assert tokens_line("alice", "completion", 7.0) in text
    assert tokens_line("bob", "prompt", 11.0) in text
    assert 'kind="completion",user="bob"' not in text


def test_token_labels_are_bounded_like_the_request_labels():
    metrics = Metrics(idle)
    for i in range(MAX_USER_LABELS):
        metrics.observe("/v1/chat/completions", 200, f"user{i}", 0.1, 1, 1)
    for late in ("late1", "late2"):
        metrics.observe("/v1/chat/completions", 200, late, 0.1, 4, 2)

    text = metrics.render().decode()

    assert tokens_line(OTHER_USERS, "prompt", 8.0) in text
    assert tokens_line(OTHER_USERS, "completion", 4.0) in text
    assert 'user="late1"' not in text and 'user="late2"' not in text
    token_series = [line for line in text.splitlines() if line.startswith("llamagate_tokens_total")]
    assert len(token_series) == 2 * (MAX_USER_LABELS + 1)


@pytest.mark.asyncio
async def test_metrics_count_each_users_tokens_from_the_answers_usage(gateway, db):
    alice, bob = await add_user(db, "alice"), await add_user(db, "bob")
    for key in (alice, alice, bob):
        response = await gateway.post("/v1/chat/completions", json=chat(), headers=bearer(key))
        assert response.status == 200

    text = await (await gateway.get("/metrics")).text()

    # The fake upstream's usage is 7 prompt and 5 completion tokens per answer.
    assert tokens_line("alice", "prompt", 14.0) in text
    assert tokens_line("alice", "completion", 10.0) in text
    assert tokens_line("bob", "prompt", 7.0) in text
    assert tokens_line("bob", "completion", 5.0) in text
