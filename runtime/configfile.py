"""Edit runtime/config.env in place, keeping its comments, its other keys and mode 600."""

from __future__ import annotations

import os
import re
from pathlib import Path


def set_config_value(path: Path, key: str, value: str) -> None:
    """Set KEY=value, replacing the existing line or appending one; atomic."""
    lines = path.read_text().splitlines() if path.is_file() else []
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*=")
    replaced = False
    for index, line in enumerate(lines):
        if pattern.match(line):
            lines[index] = f"{key}={value}"
            replaced = True
    if not replaced:
        lines.append(f"{key}={value}")
    partial = path.with_name(path.name + ".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    partial.replace(path)
