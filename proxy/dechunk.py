"""Decoding an HTTP/1.1 chunked body (RFC 9112 §7.1) as its bytes arrive, split anywhere.

llama_cpp.server (uvicorn) sends a streamed answer in chunked transfer encoding, one
chunk per event. The raw stream relay (proxy/rawrelay.py) reads the socket itself, so it
takes the framing off here: each read gives back the payload bytes it completed, and
whatever was cut short (a size line, a chunk's data, its CRLF, a trailer) is kept for
the next read. Chunk extensions and trailer fields are allowed and ignored.

A bad size line is a broken backend, not something to guess around: BadChunking names
what was wrong, and the relay ends the stream with an error event.
"""

from __future__ import annotations

# Longer than any size line (hex digits and extensions) or trailer a sane server sends;
# a backend that sends more without a line end is broken, and must not fill memory.
MAX_LINE_BYTES = 4096
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
# Where the decoder is between reads.
SIZE, DATA, DATA_END, TRAILER, DONE = range(5)


class BadChunking(ValueError):
    """The upstream's chunked body is malformed; the message says how."""


class ChunkedDecoder:
    """Feeds on raw body bytes, gives back the payload; `is_done` after the last chunk."""

    def __init__(self) -> None:
        self.state = SIZE
        self.remaining = 0  # payload bytes still due in the current chunk
        self.partial = b""  # a size line, a CRLF or a trailer line cut short by the read

    @property
    def is_done(self) -> bool:
        return self.state == DONE

    def feed(self, data: bytes) -> bytes:
        """The payload this read completed (b"" if none); raises BadChunking."""
        if self.partial:
            data, self.partial = self.partial + data, b""
        # The common case, one whole chunk per read, in one slice.
        if self.state == SIZE and data.endswith(b"\r\n"):
            line_end = data.find(b"\r\n")
            size = parse_size(data[:line_end])
            if size and len(data) == line_end + size + 4:
                return data[line_end + 2 : -2]
        pieces: list[bytes] = []
        at, end = 0, len(data)
        while at < end:
            if self.state == DATA:
                take = min(self.remaining, end - at)
                pieces.append(data[at : at + take])
                at += take
                self.remaining -= take
                if not self.remaining:
                    self.state = DATA_END
            elif self.state == DONE:
                raise BadChunking(f"{end - at} bytes after the chunked body's end")
            else:
                line_end = data.find(b"\r\n", at)
                if line_end < 0:
                    self._keep_partial(data[at:])
                    break
                self._take_line(data[at:line_end])
                at = line_end + 2
        return b"".join(pieces)

    def _take_line(self, line: bytes) -> None:
        if self.state == SIZE:
            self.remaining = parse_size(line)
            self.state = DATA if self.remaining else TRAILER
        elif self.state == DATA_END:
            if line:
                raise BadChunking(f"a chunk's data ran past its size (next: {line[:40]!r})")
            self.state = SIZE
        elif not line:  # TRAILER: an empty line ends the trailer section and the body
            self.state = DONE

    def _keep_partial(self, rest: bytes) -> None:
        if len(rest) > MAX_LINE_BYTES:
            raise BadChunking(
                f"a chunk-size or trailer line longer than {MAX_LINE_BYTES} bytes "
                f"(starts {rest[:40]!r})"
            )
        self.partial = rest


def parse_size(line: bytes) -> int:
    """The size of a chunk-size line (hex, with optional `;extensions`); raises BadChunking."""
    digits = line.split(b";", 1)[0].strip(b" \t")
    if not digits or not HEX_DIGITS.issuperset(digits) or len(digits) > 16:
        raise BadChunking(f"bad chunk-size line {line[:40]!r}: expected hex digits")
    return int(digits, 16)
