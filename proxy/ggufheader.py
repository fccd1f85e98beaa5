"""Reading a GGUF file's header: its scalar metadata, and whether its tensor data is whole.

gguf's GGUFReader builds a numpy view of every element of every array field (the
fallback model's vocabulary and merges are ~100,000 strings) and took 3-10 s per file on
2 cores; `start` reads the model before every launch. This reads the same header with
struct and skips the arrays (but those asked for), in a few hundred milliseconds at most.
It lives in proxy/ because the gateway reads the chat template with it (proxy/
chattemplate.py) and must not import the console; the console imports it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

STRING, ARRAY = 8, 9
# Value types with a fixed size: struct format of one item.
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"}
SCALAR_FORMATS |= {10: "Q", 11: "q", 12: "d"}


class HeaderError(ValueError):
    """The header cannot be read: not GGUF, an unknown type, or cut short."""


@dataclass(frozen=True)
class GGUFHeader:
    """The scalar and string metadata of a file, and the bytes its tensors need."""

    fields: dict[str, object]
    data_bytes_needed: int  # from the start of the file to the end of the last tensor


def read_header(path: Path) -> GGUFHeader:
    """Read path's metadata and tensor table; raise HeaderError if either is broken."""
    with open(path, "rb") as stream:
        tensor_count, fields = read_fields(stream)
        tensor_ends = [_read_tensor_end(stream) for _ in range(tensor_count)]
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0:
            raise HeaderError(f"general.alignment is {alignment!r}")
        data_start = -(-stream.tell() // alignment) * alignment
    return GGUFHeader(fields, data_start + max(tensor_ends, default=0))


def read_fields(
    stream: BinaryIO, arrays: frozenset[str] = frozenset()
) -> tuple[int, dict[str, object]]:
    """The tensor count and the metadata; arrays are None unless named in `arrays`."""
    if stream.read(4) != GGUF_MAGIC:
        raise HeaderError("it does not start with 'GGUF'")
    version, tensor_count, field_count = _unpack(stream, "<IQQ")
    if version not in (2, 3):
        raise HeaderError(f"GGUF version {version} is not supported (only 2 and 3)")
    fields: dict[str, object] = {}
    for _ in range(field_count):
        name = _read_string(stream)
        fields[name] = _read_value(stream, _unpack(stream, "<I")[0], name in arrays)
    return tensor_count, fields


def _unpack(stream: BinaryIO, layout: str) -> tuple:
    size = struct.calcsize(layout)
    raw = stream.read(size)
    if len(raw) != size:
        raise HeaderError("the file ends inside its header")
    return struct.unpack(layout, raw)


def _read_string(stream: BinaryIO) -> str:
    (length,) = _unpack(stream, "<Q")
    raw = stream.read(length)
    if len(raw) != length:
        raise HeaderError("the file ends inside its header")
    return raw.decode("utf-8", errors="replace")


def _read_value(stream: BinaryIO, value_type: int, keep_array: bool = False) -> object:
    """A scalar or a string; None for an array, which is skipped unless kept."""
    if value_type == STRING:
        return _read_string(stream)
    if value_type in SCALAR_FORMATS:
        return _unpack(stream, "<" + SCALAR_FORMATS[value_type])[0]
    if value_type != ARRAY:
        raise HeaderError(f"unknown metadata value type {value_type}")
    item_type, count = _unpack(stream, "<IQ")
    if keep_array:
        return [_read_value(stream, item_type, True) for _ in range(count)]
    if item_type in SCALAR_FORMATS:
        stream.seek(count * struct.calcsize(SCALAR_FORMATS[item_type]), 1)
    else:
        for _ in range(count):
            _read_value(stream, item_type)
    return None


def _read_tensor_end(stream: BinaryIO) -> int:
    """One entry of the tensor table: where its data ends, from the start of the data."""
    # Imported here: gguf pulls in numpy, which only model commands need.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = _read_string(stream)
    (dimension_count,) = _unpack(stream, "<I")
    dimensions = _unpack(stream, f"<{dimension_count}Q")
    tensor_type, offset = _unpack(stream, "<IQ")
    try:
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
    except (ValueError, KeyError):
        raise HeaderError(f"tensor {name} has an unknown type {tensor_type}") from None
    return offset + prod(dimensions) // block_size * block_bytes
