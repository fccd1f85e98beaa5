"""runtime/logpump.py: a size-rotated log, and the pump that feeds it from a pipe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runtime.logpump import RotatingLog
from runtime.settings import CODE_DIR


def numbered_lines(count: int, width: int = 20) -> list[bytes]:
    return [f"line {index:0{width - 6}d}\n".encode() for index in range(count)]


def rotated_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.*"), key=lambda p: int(p.suffix[1:]))


def read_oldest_first(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in reversed(rotated_files(path))) + path.read_bytes()


def test_log_below_max_bytes_is_not_rotated(tmp_path):
    path = tmp_path / "logs" / "backend.log"
    log = RotatingLog(path, max_bytes=100, backups=3)
    for line in numbered_lines(5):
        log.write(line)
    assert path.read_bytes() == b"".join(numbered_lines(5))
    assert rotated_files(path) == []


def test_log_rotates_into_numbered_files_at_max_bytes(tmp_path):
    path = tmp_path / "backend.log"
    log = RotatingLog(path, max_bytes=100, backups=3)
    lines = numbered_lines(12)  # 20 bytes each: 5 per file
    for line in lines:
        log.write(line)
    assert [p.name for p in rotated_files(path)] == ["backend.log.1", "backend.log.2"]
    assert path.read_bytes() == b"".join(lines[10:])
    assert (tmp_path / "backend.log.1").read_bytes() == b"".join(lines[5:10])
    assert (tmp_path / "backend.log.2").read_bytes() == b"".join(lines[:5])


def test_log_keeps_at_most_backups_rotated_files_and_the_newest_lines(tmp_path):
    path = tmp_path / "backend.log"
    log = RotatingLog(path, max_bytes=100, backups=2)
    lines = numbered_lines(60)
    for line in lines:
        log.write(line)
    assert [p.name for p in rotated_files(path)] == ["backend.log.1", "backend.log.2"]
    for file in [path, *rotated_files(path)]:
        assert file.stat().st_size <= 100
    assert read_oldest_first(path) == b"".join(lines[-15:])  # three files of five lines


def test_reopened_log_appends_and_rotates_from_its_current_size(tmp_path):
    path = tmp_path / "backend.log"
    path.write_bytes(b"x" * 90)
    log = RotatingLog(path, max_bytes=100, backups=1)
    log.write(b"0123456789abcdefghi\n")
    assert (tmp_path / "backend.log.1").read_bytes() == b"x" * 90
    assert path.read_bytes() == b"0123456789abcdefghi\n"


def run_pump(path: Path, max_bytes: int, backups: int, data: bytes) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "runtime.logpump", str(path), str(max_bytes), str(backups)]
    return subprocess.run(command, cwd=CODE_DIR, input=data, capture_output=True, timeout=30)


def test_pump_writes_every_line_from_stdin_and_exits_0_at_eof(tmp_path):
    path = tmp_path / "logs" / "backend.log"
    data = b"".join(numbered_lines(2000))
    result = run_pump(path, 10_000_000, 3, data)
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == data


def test_pump_rotates_while_copying(tmp_path):
    path = tmp_path / "backend.log"
    data = b"".join(numbered_lines(50))
    result = run_pump(path, 200, 5, data)
    assert result.returncode == 0, result.stderr
    assert len(rotated_files(path)) == 4
    assert read_oldest_first(path) == data
