"""Token counts from an answer, read on the way through without slowing the relay.

A whole answer carries `usage`. A stream from llama_cpp.server 0.3 carries none: it
sends one event per generated token, so the events with text are the completion
tokens. Decoding every event's JSON to find them cost more than the rest of the relay
together, so a stream is read as bytes instead:

- an event has text when its JSON holds `"content": "` or `"text": "` followed by
  anything but the closing quote. Inside a JSON string a quote is always escaped (`\\"`),
  so a token whose text spells `"content": "` cannot be taken for the key;
- only an event that holds `"usage": {` is decoded (newer servers send usage in a last
  event, and it wins), and the stream's first event, once, for the `id`, `model`,
  `created` and `object` that a usage event of the gateway's own must repeat;
- `data: [DONE]` counts only at the start of a line: a newline inside a JSON string is
  escaped too.
"""

from __future__ import annotations

import contextlib
import json

DONE_LINE = b"data: [DONE]"
# With and without the space: llama_cpp.server writes json.dumps' default separators.
TEXT_KEYS = (b'"content": "', b'"content":"', b'"text": "', b'"text":"')
EMPTY_TEXTS = (b'"content": ""', b'"content":""', b'"text": ""', b'"text":""')
USAGE_KEYS = (b'"usage": {', b'"usage":{')
USAGE_MARK = b'"usage"'
# What a usage event of the gateway's own copies from the stream's first event.
STREAM_FIELDS = ("id", "object", "created", "model")


class UsageCounter:
    """Token counts of one answer: its `usage`, or for a stream, one per event with text."""

    def __init__(self) -> None:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.content_chunks = 0
        self.partial = b""
        self.saw_done = False
        self.has_usage = False
        self.done_offset = -1  # where [DONE] starts in the last chunk fed; -1 if not in it
        self.stream_fields: dict | None = None

    def feed_json(self, body: bytes) -> None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            self._take_usage(json.loads(body))

    def feed_stream(self, chunk: bytes) -> None:
        """Take the next bytes of a stream, split anywhere; only whole lines are read."""
        carried = len(self.partial)
        data = self.partial + chunk if carried else chunk
        end = data.rfind(b"\n") + 1
        self.partial = data[end:]
        if end == 0:
            return
        lines = data[:end]
        done = lines.find(DONE_LINE) if lines.startswith(DONE_LINE) else -1
        if done < 0 and (found := lines.find(b"\n" + DONE_LINE)) >= 0:
            done = found + 1
        if done >= 0:
            self.saw_done = True
            self.done_offset = done - carried
            lines = lines[:done]
        self._count(lines)

    def finish_stream(self) -> None:
        if self.completion_tokens is None and self.content_chunks:
            self.completion_tokens = self.content_chunks

    def _count(self, lines: bytes) -> None:
        count = lines.count
        self.content_chunks += sum(map(count, TEXT_KEYS)) - sum(map(count, EMPTY_TEXTS))
        if self.stream_fields is None and lines.startswith(b"data:"):
            self._take_first_event(lines.split(b"\n", 1)[0][5:])
        # One scan for the common case, a token event, before the exact keys.
        if USAGE_MARK in lines and any(key in lines for key in USAGE_KEYS):
            for line in lines.split(b"\n"):
                if line.startswith(b"data:") and any(key in line for key in USAGE_KEYS):
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        self._take_usage(json.loads(line[5:]))

    def _take_first_event(self, data: bytes) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        fields = event if isinstance(event, dict) else {}
        self.stream_fields = {name: fields[name] for name in STREAM_FIELDS if name in fields}

    def _take_usage(self, answer: dict) -> None:
        usage = answer.get("usage")
        if isinstance(usage, dict):
            self.has_usage = True
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")

    def usage_event(self) -> bytes:
        """The usage event OpenAI sends last when asked (stream_options.include_usage)."""
        prompt, completion = self.prompt_tokens, self.completion_tokens or 0
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": None if prompt is None else prompt + completion,
        }
        event = {**(self.stream_fields or {}), "choices": [], "usage": usage}
        return b"data: " + json.dumps(event).encode() + b"\n\n"
