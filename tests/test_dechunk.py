"""proxy/dechunk.py: chunked transfer decoding, fed as a socket may split it."""

from __future__ import annotations

import pytest

from proxy.dechunk import MAX_LINE_BYTES, BadChunking, ChunkedDecoder

EVENTS = [b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n', b"data: [DONE]\n\n"]
# As uvicorn frames them, plus an extension on one size line and a trailer at the end.
BODY = (
    b"%x\r\n%s\r\n" % (len(EVENTS[0]), EVENTS[0])
    + b"%x;name=value\r\n%s\r\n" % (len(EVENTS[1]), EVENTS[1])
    + b"0\r\nX-Trailer: yes\r\n\r\n"
)


def decode_in_pieces(body: bytes, cuts: list[int]) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder()
    edges = [0, *cuts, len(body)]
    payload = b"".join(decoder.feed(body[a:b]) for a, b in zip(edges, edges[1:], strict=False))
    return payload, decoder


def test_a_body_split_at_every_byte_boundary_decodes_to_the_same_payload():
    for cut in range(1, len(BODY)):
        payload, decoder = decode_in_pieces(BODY, [cut])
        assert payload == b"".join(EVENTS), cut
        assert decoder.is_done, cut


def test_a_body_fed_one_byte_at_a_time_decodes_and_ends():
    payload, decoder = decode_in_pieces(BODY, list(range(1, len(BODY))))
    assert payload == b"".join(EVENTS)
    assert decoder.is_done


def test_one_whole_chunk_per_read_gives_its_payload_and_the_last_chunk_ends_the_body():
    decoder = ChunkedDecoder()
    for event in EVENTS:
        assert decoder.feed(b"%x\r\n%s\r\n" % (len(event), event)) == event
        assert not decoder.is_done
    assert decoder.feed(b"0\r\n\r\n") == b""
    assert decoder.is_done


def test_upper_case_hex_sizes_and_spaces_before_an_extension_are_read():
    decoder = ChunkedDecoder()
    data = b"A" * 26
    assert decoder.feed(b"1A ;ext\r\n" + data + b"\r\n0\r\n\r\n") == data
    assert decoder.is_done


@pytest.mark.parametrize("line", [b"zz", b"", b"-5", b"0x10", b"1" * 17])
def test_a_bad_size_line_is_an_error_that_shows_it(line):
    with pytest.raises(BadChunking, match="bad chunk-size line .*expected hex digits"):
        ChunkedDecoder().feed(line + b"\r\nabc\r\n")


def test_a_chunk_whose_data_runs_past_its_size_is_an_error():
    with pytest.raises(BadChunking, match="ran past its size"):
        ChunkedDecoder().feed(b"2\r\nabcd\r\n")


def test_a_size_line_that_never_ends_is_an_error_before_it_fills_memory():
    decoder = ChunkedDecoder()
    decoder.feed(b"1" * MAX_LINE_BYTES)  # still waiting: a line may be split
    with pytest.raises(BadChunking, match=f"longer than {MAX_LINE_BYTES} bytes"):
        decoder.feed(b"1")


def test_bytes_after_the_end_of_the_body_are_an_error():
    decoder = ChunkedDecoder()
    decoder.feed(b"0\r\n\r\n")
    with pytest.raises(BadChunking, match="after the chunked body's end"):
        decoder.feed(b"5\r\nhello\r\n")
