"""The console's exclusive lock, so that overlapping runs (cron, people) take turns."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = "console.lock"


@contextmanager
def console_lock(
    run_dir: Path, *, wait: bool = True, on_wait: Callable[[], None] | None = None
) -> Iterator[bool]:
    """Hold runtime/run/console.lock; yield False at once if busy and wait is False."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if on_wait:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        # Closing the descriptor releases the flock.
        os.close(fd)
