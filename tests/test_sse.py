"""The SSE decoder against the WHATWG event-stream rules, and the encoder round trip."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay.providers._sse import ServerSentEvent, SSEDecoder, comment, encode_event


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.end()


def bytewise(data: bytes) -> list[ServerSentEvent]:
    return decode(*(data[i:i + 1] for i in range(len(data))))


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_endings(newline: bytes) -> None:
    body = b"data: a" + newline + b"data: b" + newline + newline + b"data: c" + newline * 2
    expected = [ServerSentEvent("a\nb"), ServerSentEvent("c")]
    assert decode(body) == expected
    assert bytewise(body) == expected


def test_crlf_split_between_reads_is_one_line_ending() -> None:
    # "data: a\r" | "\n\r\n": the LF after the split CR must not make an extra blank line.
    assert decode(b"data: a\r", b"\n", b"data: b\r\n\r\n") == [ServerSentEvent("a\nb")]
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [ServerSentEvent("a\nb")]


def test_mixed_line_endings_in_one_read() -> None:
    assert decode(b"data: a\rdata: b\ndata: c\r\n\r\n") == [ServerSentEvent("a\nb\nc")]


def test_only_one_leading_space_is_removed() -> None:
    assert decode(b"data:a\n\ndata:  b\n\ndata:\n\n") == [
        ServerSentEvent("a"), ServerSentEvent(" b"), ServerSentEvent("")
    ]


def test_comments_are_ignored() -> None:
    assert decode(b": ping\n\n:\n\ndata: x\n: inside\ndata: y\n\n") == [ServerSentEvent("x\ny")]


def test_block_without_data_dispatches_nothing() -> None:
    assert decode(b"event: e\n\ndata: x\n\n") == [ServerSentEvent("x")]


def test_event_type_resets_after_dispatch() -> None:
    assert decode(b"event: add\ndata: 1\n\ndata: 2\n\nevent:\ndata: 3\n\n") == [
        ServerSentEvent("1", "add"), ServerSentEvent("2"), ServerSentEvent("3")
    ]


def test_id_persists_and_nul_id_is_ignored() -> None:
    events = decode(b"id: 7\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\nid\ndata: d\n\n")
    assert [e.id for e in events] == ["7", "7", "7", ""]


def test_retry_only_with_digits() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"retry: 1500\ndata: a\n\nretry: 1.5\ndata: b\n\nretry: x\n\n")
    assert [e.retry for e in events] == [1500, None]
    assert decoder.retry == 1500


def test_field_without_colon_and_unknown_fields() -> None:
    assert decode(b"data\ndata\n\nfoo: bar\ndata: x\n\n") == [
        ServerSentEvent("\n"), ServerSentEvent("x")
    ]


def test_colon_in_value_is_kept() -> None:
    assert decode(b'data: {"a": "b:c"}\n\n') == [ServerSentEvent('{"a": "b:c"}')]


def test_unterminated_event_is_discarded_at_end() -> None:
    assert decode(b"data: a\n\ndata: b\n") == [ServerSentEvent("a")]
    assert decode(b"data: a\n\ndata: b") == [ServerSentEvent("a")]


def test_bom_is_dropped_only_at_the_start() -> None:
    bom = "\ufeff".encode()
    assert decode(bom + b"data: a\n\n") == [ServerSentEvent("a")]
    assert bytewise(bom + b"data: a\n\n") == [ServerSentEvent("a")]
    # A second BOM is part of the field name, so that line is an unknown field.
    assert decode(bom + bom + b"data: a\n\ndata: b\n\n") == [ServerSentEvent("b")]


def test_multibyte_utf8_split_across_reads() -> None:
    body = "data: héllo ☀️ 𝄞\n\n".encode()
    assert bytewise(body) == [ServerSentEvent("héllo ☀️ 𝄞")]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert decode(b"data: a\xffb\n\n") == [ServerSentEvent("a\ufffdb")]


def test_long_line_in_many_reads() -> None:
    payload = "x" * 100_000
    body = f"data: {payload}\n\n".encode()
    chunks = [body[i:i + 1000] for i in range(0, len(body), 1000)]
    assert decode(*chunks) == [ServerSentEvent(payload)]


def test_encode_event_fields() -> None:
    assert encode_event("x") == b"data: x\n\n"
    assert encode_event("a\r\nb\rc\nd", id=3, event="delta", retry=10) == (
        b"event: delta\nid: 3\nretry: 10\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
    )
    assert encode_event(" lead") == b"data:  lead\n\n"
    assert decode(encode_event(" lead")) == [ServerSentEvent(" lead")]
    with pytest.raises(ValueError):
        encode_event("x", event="a\nb")
    with pytest.raises(ValueError):
        encode_event("x", id="a\0b")


def test_comment_frames_decode_to_nothing() -> None:
    assert comment("ping") == b": ping\n\n"
    assert comment() == b":\n\n"
    assert decode(comment("two\nlines"), encode_event("x")) == [ServerSentEvent("x")]


_single_line = st.text(st.characters(blacklist_characters="\r\n\0", codec="utf-8"), max_size=8)
_events = st.lists(
    st.tuples(
        st.text(st.characters(codec="utf-8"), max_size=40),
        st.none() | _single_line,
        st.none() | _single_line,
        st.booleans(),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(events=_events, cuts=st.lists(st.integers(min_value=0), max_size=12), crlf=st.booleans())
def test_round_trip_split_anywhere(
    events: list[tuple[str, str | None, str | None, bool]], cuts: list[int], crlf: bool
) -> None:
    body = b""
    expected: list[ServerSentEvent] = []
    last_id: str | None = None
    for data, event, id_, heartbeat in events:
        if heartbeat:
            body += comment("keep-alive")
        body += encode_event(data, id=id_, event=event)
        last_id = id_ if id_ is not None else last_id
        normalized = data.replace("\r\n", "\n").replace("\r", "\n")
        expected.append(ServerSentEvent(normalized, event or "message", last_id))
    if crlf:
        body = body.replace(b"\n", b"\r\n")
    points = sorted({c % (len(body) + 1) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)]
    assert decode(*chunks) == expected
