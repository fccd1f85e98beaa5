"""Load through a running gateway from client threads: short requests in a loop, and streams
whose events are timed. Used by the tests that kill or restart replicas under load.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

# SmolLM2's end-of-text and end-of-turn tokens, banned so that a stream runs max_tokens long.
NO_EOS = {"0": -100.0, "2": -100.0}


def short_chat(seed: int) -> dict:
    return {
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "seed": seed,
    }


def long_completion(max_tokens: int) -> dict:
    return {
        "prompt": "Write a long story about a lighthouse keeper.",
        "max_tokens": max_tokens,
        "logit_bias": NO_EOS,
        "stream": True,
    }


@dataclass
class TimedStream:
    """One streamed answer: the arrival time of each event and how it ended."""

    status: int = 0
    events: list[tuple[float, dict]] = field(default_factory=list)  # (monotonic, event)
    is_done: bool = False  # ended with data: [DONE]

    @property
    def times(self) -> list[float]:
        return [at for at, _ in self.events]

    @property
    def error_codes(self) -> list[str]:
        return [event["error"].get("code") for _, event in self.events if "error" in event]


def post(base_url: str, key: str, path: str, body: dict) -> urllib.request.Request:
    return urllib.request.Request(
        base_url + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )


def read_stream(base_url: str, key: str, body: dict, started: threading.Event | None = None):
    """POST a streamed request and time its events; `started` is set at the first event."""
    result = TimedStream()
    with urllib.request.urlopen(post(base_url, key, "/v1/completions", body), timeout=60) as answer:
        result.status = answer.status
        for raw in answer:  # http.client reads the chunked body line by line, as it arrives
            line = raw.decode().rstrip("\n")
            if line == "data: [DONE]":
                result.is_done = True
            elif line.startswith("data: "):
                result.events.append((time.monotonic(), json.loads(line[6:])))
                if started is not None:
                    started.set()
    return result


class ShortRequestLoad:
    """Client threads that each send short chat requests, one after another, until stopped.

    Every answer other than a 200 with a completion counts as a failure, with its reason.
    """

    def __init__(self, base_url: str, key: str, threads: int = 3) -> None:
        self.base_url = base_url
        self.key = key
        self.answered = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.is_stopping = threading.Event()
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(threads)]

    def __enter__(self) -> ShortRequestLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.is_stopping.set()
        for thread in self.threads:
            thread.join(timeout=70)

    def loop(self) -> None:
        seed = 0
        while not self.is_stopping.is_set():
            seed += 1
            failure = self.ask(
                post(self.base_url, self.key, "/v1/chat/completions", short_chat(seed))
            )
            with self.lock:
                if failure is None:
                    self.answered += 1
                else:
                    self.failures.append(failure)

    @staticmethod
    def ask(request: urllib.request.Request) -> str | None:
        """Send one request; None when it was answered with a completion, else why not."""
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                text = answer.read().decode()
        except urllib.error.HTTPError as error:
            return f"HTTP {error.code}: {error.read()[:300]!r}"
        except OSError as error:
            return f"{type(error).__name__}: {error}"
        return None if json.loads(text).get("choices") else text[:300]

    def answered_at_least(self, count: int) -> bool:
        with self.lock:
            return self.answered >= count
