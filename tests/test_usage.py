"""proxy/usage.py and the relay's split at [DONE] (proxy/relay.py): pure logic on bytes."""

from __future__ import annotations

import json

import pytest

from proxy import usage
from proxy.relay import split_done_prefix
from proxy.usage import UsageCounter
from runtime.bench.sse import sse_events


def event(payload: dict, separators: tuple[str, str] | None = None) -> bytes:
    return b"data: " + json.dumps(payload, separators=separators).encode() + b"\n\n"


def fed(*chunks: bytes) -> UsageCounter:
    counter = UsageCounter()
    for chunk in chunks:
        counter.feed_stream(chunk)
    counter.finish_stream()
    return counter


def test_a_long_stream_is_counted_with_only_its_first_event_decoded(monkeypatch):
    decoded: list[bytes] = []
    real_loads = json.loads
    monkeypatch.setattr(usage.json, "loads", lambda data: decoded.append(data) or real_loads(data))
    counter = fed(*sse_events(256))
    assert counter.saw_done
    assert counter.completion_tokens == 256
    assert len(decoded) == 1  # the first event, for the id, model, created and object


@pytest.mark.parametrize("separators", [None, (",", ":")])
def test_only_events_with_text_count_whatever_the_json_spacing(separators):
    events = [
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [{"delta": {"content": ""}}]},
        {"choices": [{"delta": {"content": None}}]},
        {"choices": [{"delta": {"content": '"content": "x'}}]},  # the key, as text
        {"choices": [{"delta": {"content": '"'}}]},
        {"choices": [{"delta": {}, "logprobs": {"content": [{"token": "a"}]}}]},
        {"choices": [{"text": "c", "logprobs": {"text_offset": [0]}}]},
        {"choices": [{"text": "", "finish_reason": "stop"}]},
    ]
    stream = b"".join(event(e, separators) for e in events) + b"data: [DONE]\n\n"
    for size in (1, 5, len(stream)):
        counter = fed(*(stream[i : i + size] for i in range(0, len(stream), size)))
        assert counter.completion_tokens == 4, size
        assert counter.saw_done


def test_done_counts_only_at_the_start_of_a_line_and_its_offset_is_in_the_last_chunk():
    text = event({"choices": [{"delta": {"content": "data: [DONE]\n\ndata: [DONE]"}}]})
    counter = fed(text)
    assert not counter.saw_done and counter.completion_tokens == 1
    last = event({"choices": [{"delta": {"content": "b"}}]}) + b"data: [DONE]\n\n"
    counter.feed_stream(last)
    assert counter.saw_done
    assert last[counter.done_offset :] == b"data: [DONE]\n\n"


def test_usage_in_a_stream_wins_and_is_the_only_other_event_decoded(monkeypatch):
    decoded: list[bytes] = []
    real_loads = json.loads
    monkeypatch.setattr(usage.json, "loads", lambda data: decoded.append(data) or real_loads(data))
    stream = sse_events(3)
    stream.insert(-1, event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}))
    counter = fed(*stream)
    assert (counter.prompt_tokens, counter.completion_tokens) == (9, 4)
    assert counter.has_usage
    assert len(decoded) == 2


def test_the_usage_event_repeats_the_streams_id_model_created_and_object():
    counter = fed(*sse_events(5)[:-1])
    counter.prompt_tokens = 22
    sent = counter.usage_event()
    assert sent.startswith(b"data: ") and sent.endswith(b"\n\n")
    payload = json.loads(sent[6:])
    first = json.loads(sse_events(1)[0][6:])
    for name in ("id", "model", "created", "object"):
        assert payload[name] == first[name]
    assert payload["choices"] == []
    assert payload["usage"] == {"prompt_tokens": 22, "completion_tokens": 5, "total_tokens": 27}


@pytest.mark.parametrize(
    "chunk, sent, held",
    [
        (b'data: {"a": 1}\n\ndata: [DO', b'data: {"a": 1}\n\n', b"data: [DO"),
        (b"data: [DONE]", b"", b"data: [DONE]"),
        (b'data: {"a": 1}\n\nd', b'data: {"a": 1}\n\n', b"d"),
        (b'data: {"a": 1}\n\ndata: {"b"', b'data: {"a": 1}\n\ndata: {"b"', b""),
        (b"data: [DONE]\n\n", b"data: [DONE]\n\n", b""),
    ],
)
def test_the_relay_holds_back_only_a_done_line_cut_short(chunk, sent, held):
    assert split_done_prefix(chunk) == (sent, held)
