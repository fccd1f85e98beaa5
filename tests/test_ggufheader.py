"""proxy/ggufheader.py on small hand-made headers: what it reads, skips and refuses."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from proxy.ggufheader import HeaderError, read_header


def gguf_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def write_gguf(path: Path, fields: bytes, field_count: int, version: int = 3) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, field_count) + fields)
    return path


def test_scalars_and_strings_are_read_and_arrays_skipped(tmp_path):
    fields = (
        gguf_string("general.architecture") + struct.pack("<I", 8) + gguf_string("llama")
        + gguf_string("tokens") + struct.pack("<IIQ", 9, 8, 2)
        + gguf_string("a") + gguf_string("bc")
        + gguf_string("scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 1, 2, 3)
        + gguf_string("llama.context_length") + struct.pack("<II", 4, 8192)
    )  # fmt: skip
    header = read_header(write_gguf(tmp_path / "m.gguf", fields, 4))
    assert header.fields == {
        "general.architecture": "llama",
        "tokens": None,
        "scores": None,
        "llama.context_length": 8192,
    }


@pytest.mark.parametrize(
    ("fields", "count", "version", "message"),
    [
        (b"", 0, 1, "version 1"),
        (gguf_string("x") + struct.pack("<I", 99), 1, 3, "unknown metadata value type 99"),
        (gguf_string("x") + struct.pack("<I", 8) + struct.pack("<Q", 50) + b"short", 1, 3, "ends"),
        (b"", 1, 3, "ends inside its header"),
    ],
    ids=["old-version", "unknown-type", "string-cut-short", "field-missing"],
)
def test_a_broken_header_is_refused_with_its_reason(tmp_path, fields, count, version, message):
    path = write_gguf(tmp_path / "m.gguf", fields, count, version)
    with pytest.raises(HeaderError, match=message):
        read_header(path)
