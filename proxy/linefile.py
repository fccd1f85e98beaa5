"""An append-only file of lines with a replay offset: what the request log's spool
(proxy/spool.py) and the token charges' spool (proxy/chargespool.py) share.

Next to the file, `<file>.offset` holds the byte offset up to which lines are in the
database; it is rewritten atomically (write, fsync, rename) after each replayed chunk.
Once the offset reaches the end, both files are removed. An append first ends a line
torn by a crash, so that the torn line is skipped alone when read back and cannot
swallow the line written after it. All file work runs on one thread of the file's own,
in order, so the event loop never waits for the disk and an append never interleaves
with a read. Files are created 0600 and a missing directory 0700: the lines name users.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def make_private_dir(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)
        directory.chmod(0o700)  # mkdir's mode is filtered by the umask


def append_within(path: Path, lines: Iterable[bytes], max_bytes: int | None = None) -> int:
    """Append whole lines durably (one fsync); how many fitted under max_bytes, in order.

    Raises OSError if the disk refuses. Blocking: call it on the file's thread.
    """
    make_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        status = os.fstat(fd)
        if stat.S_ISREG(status.st_mode):
            # A file left by an older version may be wider. Only a regular file: a spool
            # pointed at a device (/dev/full, /dev/null) must not change the host's device.
            os.fchmod(fd, 0o600)
        size = status.st_size
        prefix = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        taken, length = [prefix], len(prefix)
        for line in lines:
            if max_bytes is not None and size + length + len(line) > max_bytes:
                break
            taken.append(line)
            length += len(line)
        if length:
            os.write(fd, b"".join(taken))
            os.fsync(fd)
        return len(taken) - 1
    finally:
        os.close(fd)


class LineFile:
    """The file, its offset and its thread; `label` and `kind` name it in log lines
    ("request log", "spool" gives "request log: skipping a torn spool line ...")."""

    def __init__(self, path: Path, label: str, kind: str) -> None:
        self.path = path
        self.offset_path = path.with_name(path.name + ".offset")
        self.label = label
        self.kind = kind
        self._executor: ThreadPoolExecutor | None = None

    async def on_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._executor is None:
            name = self.kind.replace(" ", "")
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def close(self) -> None:
        """Let the file's thread end (after its queued work)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def has_lines(self) -> bool:
        """Lines not yet replayed; False if there is no file. Blocking."""
        try:
            return self.path.stat().st_size > self.read_offset()
        except (FileNotFoundError, NotADirectoryError):  # no file, so no lines
            return False

    def read_lines(self, max_lines: int) -> tuple[list[tuple[bytes, int]], int]:
        """Up to max_lines whole lines after the offset, each with the offset past it,
        and the offset past the last line read. Blocking; OSError if unreadable."""
        end = self.read_offset()
        lines: list[tuple[bytes, int]] = []
        with open(self.path, "rb") as file:
            file.seek(end)
            while len(lines) < max_lines:
                line = file.readline()
                if not line:
                    break
                end += len(line)
                if not line.strip():
                    continue  # the newline that ended a torn line
                if not line.endswith(b"\n"):
                    # Appends run on this same thread, so none is half done now: the
                    # line was torn by a crash.
                    log.warning(
                        "%s: skipping a torn %s line at byte %d", self.label, self.kind, end
                    )
                    continue
                lines.append((line, end))
        return lines, end

    async def commit(self, offset: int) -> bool:
        """Record lines up to offset as saved; True if the file is now empty (and removed)."""
        return await self.on_thread(self._commit, offset)

    def _commit(self, offset: int) -> bool:
        if offset >= self.path.stat().st_size:
            # The offset file first: a crash in between leaves a file without an offset,
            # replayed again in full (each spool makes that harmless), never an offset
            # that would skip the lines of a later file.
            self.offset_path.unlink(missing_ok=True)
            self.path.unlink()
            return True
        partial = self.offset_path.with_name(self.offset_path.name + ".new")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, str(offset).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, self.offset_path)
        return False

    def read_offset(self) -> int:
        try:
            offset = int(self.offset_path.read_text() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            log.warning(
                "%s: %s is unreadable; replaying from the start", self.label, self.offset_path
            )
            return 0
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        return offset if 0 <= offset <= size else 0  # an offset of an older, longer file
