"""Copy a child's output into a log file that is rotated by size.

Run as `python -m runtime.logpump PATH MAX_BYTES BACKUPS` with the child's stdout on
stdin. It runs in a session of its own and exits when the child closes the pipe, so it
never outlives the child.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path


class RotatingLog:
    """An append-only file that moves to PATH.1 ... PATH.N once it passes max_bytes."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "ab")  # noqa: SIM115 - kept open for the pump's life

    def write(self, line: bytes) -> None:
        if self.handle.tell() + len(line) > self.max_bytes and self.handle.tell() > 0:
            self.rotate()
        self.handle.write(line)
        self.handle.flush()

    def rotate(self) -> None:
        self.handle.close()
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{index + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self.handle = open(self.path, "ab")  # noqa: SIM115


def main(argv: list[str]) -> int:
    path, max_bytes, backups = Path(argv[0]), int(argv[1]), int(argv[2])
    # SIGTERM goes to the whole process group; keep copying until the child's last
    # words (its shutdown messages) have arrived, and stop at end of file instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log = RotatingLog(path, max_bytes, backups)
    for line in sys.stdin.buffer:
        log.write(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
