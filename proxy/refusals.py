"""Repeated anonymous refusals, folded into one request-log row that counts them.

A client with no valid key (401), or probing routes that do not exist (404, answered
before any key is checked), can send thousands of requests a second. Each used to cost
a row, and during a database outage a line in the spool. Refusals with no user, from
the same client address, with the same status and route, within FOLD_SECONDS of the
first, are folded into the first one's row; its `repeat_count` says how many requests
it stands for. So every request is still logged: `sum(repeat_count)` counts requests,
and a lone refusal is a row of its own with repeat_count 1, like every other request.
Other 404s are folded by status alone: a scanner's paths are not worth a row each.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy import store

FOLD_SECONDS = 1.0
FOLDED_STATUSES = frozenset({401, 404})
_USERNAME = store.REQUEST_COLUMNS.index("username")
_STATUS = store.REQUEST_COLUMNS.index("status_code")
_PATH = store.REQUEST_COLUMNS.index("path")
_CLIENT = store.REQUEST_COLUMNS.index("client_addr")
_REPEATS = store.REQUEST_COLUMNS.index("repeat_count")

Row = tuple


@dataclass
class _Fold:
    first: Row
    started: float
    count: int = 1

    def row(self) -> Row:
        return (*self.first[:_REPEATS], self.count, *self.first[_REPEATS + 1 :])


class RefusalFolder:
    """Holds anonymous refusals for FOLD_SECONDS and hands back one row per group."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.folds: dict[tuple, _Fold] = {}

    def absorbs(self, row: Row) -> bool:
        """True if the row is an anonymous refusal, now held here (do not write it)."""
        status = row[_STATUS]
        if row[_USERNAME] is not None or status not in FOLDED_STATUSES:
            return False
        key = (row[_CLIENT], status, row[_PATH] if status == 401 else None)
        fold = self.folds.get(key)
        if fold is None:
            self.folds[key] = _Fold(row, self.clock())
        else:
            fold.count += 1
        return True

    def due(self, is_closing: bool = False) -> list[Row]:
        """The rows of the groups whose FOLD_SECONDS are over (of all, when closing)."""
        if not self.folds:
            return []
        cutoff = self.clock() - FOLD_SECONDS
        done = [key for key, fold in self.folds.items() if is_closing or fold.started <= cutoff]
        return [self.folds.pop(key).row() for key in done]
