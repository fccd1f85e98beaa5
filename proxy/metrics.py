"""Prometheus metrics for /metrics, in a registry of the app's own (no globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.pool import Backend
from proxy.queue import QueueStats

MAX_USER_LABELS = 100
OTHER_USERS = "_other"


class UserLabels:
    """A user's own label for the first MAX_USER_LABELS users, so series stay bounded."""

    def __init__(self, limit: int = MAX_USER_LABELS) -> None:
        self.limit = limit
        self.known: set[str] = set()

    def __call__(self, username: str | None) -> str:
        if username is None:
            return "_anonymous"
        if username in self.known:
            return username
        if len(self.known) < self.limit:
            self.known.add(username)
            return username
        return OTHER_USERS


class BackendCollector:
    """Per-backend series, read from the pool when scraped (the request path pays nothing).

    A local replica is labelled by its place in LLAMA_PROXY_BACKEND_URL, a shared member
    by its name; both carry host:port. Members come and go only by admin commands, so
    the series stay bounded.
    """

    def __init__(self, backends: Callable[[], Sequence[Backend]]) -> None:
        self.backends = backends

    def collect(self) -> Iterator[Metric]:
        labels = ["backend", "address"]
        up = GaugeMetricFamily(
            "llamagate_backend_up", "1 if the backend is in the pool", labels=labels
        )
        busy = GaugeMetricFamily(
            "llamagate_backend_busy", "Requests at the backend now", labels=labels
        )
        requests = CounterMetricFamily(
            "llamagate_backend_requests", "Requests sent to the backend", labels=labels
        )
        errors = CounterMetricFamily(
            "llamagate_backend_errors",
            "Requests the backend failed: refused, no answer, or broken off",
            labels=labels,
        )
        seconds = CounterMetricFamily(
            "llamagate_backend_busy_seconds",
            "Seconds the backend's slots were held by requests, summed over its slots",
            labels=labels,
        )
        for backend in self.backends():
            names = [backend.name or str(backend.index), backend.address]
            up.add_metric(names, 1.0 if backend.is_up else 0.0)
            busy.add_metric(names, backend.busy)
            requests.add_metric(names, backend.requests)
            errors.add_metric(names, backend.errors)
            seconds.add_metric(names, backend.seconds_busy)
        yield from (up, busy, requests, errors, seconds)


class Metrics:
    """The gateway's counters; `observe` is called once per finished request."""

    def __init__(
        self,
        queue_stats: Callable[[], QueueStats],
        backends: Callable[[], Sequence[Backend]] = tuple,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(BackendCollector(backends))
        self.user_label = UserLabels()
        self.requests = Counter(
            "llamagate_requests",
            "Requests answered, by route, status and user",
            ["route", "status", "user"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llamagate_request_duration_seconds",
            "Time from request to the last byte of the answer",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.queue_wait = Histogram(
            "llamagate_queue_wait_seconds",
            "Time spent waiting in the fair queue",
            registry=self.registry,
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.tokens = Counter(
            "llamagate_tokens",
            "Tokens processed, by user and kind (prompt or completion)",
            ["user", "kind"],
            registry=self.registry,
        )
        self.backend_waits = Counter(
            "llamagate_backend_restart_waits",
            "Requests that waited for the backend to come back from a restart",
            registry=self.registry,
        )
        self.log_rows_dropped = Counter(
            "llamagate_request_log_dropped_rows",
            "Request-log rows lost: the database was unavailable and the spool was full "
            "(LLAMA_PROXY_SPOOL_MAX_MB) or unwritable and memory full",
            registry=self.registry,
        )
        self.charge_batches_parked = Counter(
            "llamagate_token_charge_batches_parked",
            "Flushes of token charges the database did not take, written to the charge spool",
            registry=self.registry,
        )
        self.charge_batches_replayed = Counter(
            "llamagate_token_charge_batches_replayed",
            "Batches of token charges replayed from the charge spool into the database",
            registry=self.registry,
        )
        waiting = Gauge("llamagate_queue_waiting", "Requests waiting", registry=self.registry)
        waiting.set_function(lambda: queue_stats().waiting)
        active = Gauge("llamagate_queue_active", "Requests at the backend", registry=self.registry)
        active.set_function(lambda: queue_stats().active)
        # labels() validates and looks up under a lock on every call: observe() took 14-17
        # us a request on the 2-core box, 4-7 with the children kept here once found.
        # They are as many as the series themselves (routes, statuses, UserLabels).
        self._series: dict[tuple[str, int, str], tuple[Any, Any]] = {}
        self._token_series: dict[tuple[str, str], Any] = {}

    def observe(
        self,
        route: str,
        status: int,
        username: str | None,
        seconds: float,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        user = self.user_label(username)
        series = self._series.get((route, status, user))
        if series is None:
            series = self._series[route, status, user] = (
                self.requests.labels(route, str(status), user),
                self.latency.labels(route),
            )
        requests, latency = series
        requests.inc()
        latency.observe(seconds)
        if prompt_tokens:
            self._tokens_of(user, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self._tokens_of(user, "completion").inc(completion_tokens)

    def _tokens_of(self, user: str, kind: str) -> Any:
        child = self._token_series.get((user, kind))
        if child is None:
            child = self._token_series[user, kind] = self.tokens.labels(user, kind)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
