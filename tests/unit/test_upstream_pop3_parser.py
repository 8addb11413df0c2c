"""The upstream POP3 response parser alone: bytes in, events out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstream.pop3.parser import (
    BodyChunk,
    Capabilities,
    Continuation,
    Expect,
    POP3ProtocolError,
    ResponseParser,
    Status,
    parse_status,
)
from gateway.upstream.pop3.parser import _find_terminator as find_terminator


def stuff(raw: bytes) -> bytes:
    """Reference encoder: any bytes to POP3 wire form (CRLF lines, dot-stuffed).

    Every CRLF in `raw` ends a line; a missing final CRLF is added. Written
    line by line on purpose, as the obviously-correct counterpart of the
    parser's chunk-wise search.
    """
    if not raw:
        return b""
    lines = raw.split(b"\r\n")
    if raw.endswith(b"\r\n"):
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def drain(parser: ResponseParser, expect: Expect | None) -> list[object]:
    """Events of one response, stopping where it ends, as the client would."""
    events: list[object] = []
    while (event := parser.next_event(expect)) is not None:
        events.append(event)
        if _ended(events, expect):
            break
    return events


def _ended(events: list[object], expect: Expect | None) -> bool:
    last = events[-1]
    if isinstance(last, BodyChunk):
        return last.last
    if isinstance(last, Status):
        return not (last.ok and expect is Expect.MULTI)
    return False


def feed_one_response(
    chunks: list[bytes], expect: Expect = Expect.MULTI
) -> tuple[ResponseParser, list[object]]:
    """Feed chunks; once the first response is complete, expect nothing more."""
    parser = ResponseParser()
    events: list[object] = []
    for chunk in chunks:
        parser.feed(chunk)
        if not events or not _ended(events, expect):
            events.extend(drain(parser, expect))
    return parser, events


def body_of(events: list[object]) -> tuple[bytes, bool]:
    chunks = [e for e in events if isinstance(e, BodyChunk)]
    done = bool(chunks) and chunks[-1].last
    assert all(not c.last for c in chunks[:-1])
    return b"".join(c.data for c in chunks), done


def run_chunks(chunks: list[bytes], expect: Expect = Expect.MULTI) -> list[object]:
    """Feed chunks one at a time, as the transport would, collecting events."""
    return feed_one_response(chunks, expect)[1]


# --- status lines -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"+OK", Status(True, None, b"")),
        (b"+OK Dovecot ready.", Status(True, None, b"Dovecot ready.")),
        (
            b"+OK <1896.697170952@dbc.mtview.ca.us>",
            Status(True, None, b"<1896.697170952@dbc.mtview.ca.us>"),
        ),
        (b"-ERR", Status(False, None, b"")),
        (b"-ERR [IN-USE] Mailbox is locked", Status(False, "IN-USE", b"Mailbox is locked")),
        (b"-ERR [AUTH] Authentication failed.", Status(False, "AUTH", b"Authentication failed.")),
        (b"-ERR [SYS/TEMP] try later", Status(False, "SYS/TEMP", b"try later")),
        (b"-ERR [SYS/PERM] broken", Status(False, "SYS/PERM", b"broken")),
        (b"-ERR [sys/temp] lower case", Status(False, "SYS/TEMP", b"lower case")),
        (b"-ERR [LOGIN-DELAY]", Status(False, "LOGIN-DELAY", b"")),
        # Not a response code: unterminated, empty, or with a space inside.
        (b"-ERR [IN-USE oops", Status(False, None, b"[IN-USE oops")),
        (b"-ERR [] nothing", Status(False, None, b"[] nothing")),
        (b"-ERR [A B] spaced", Status(False, None, b"[A B] spaced")),
        (b"+OK [x] text", Status(True, "X", b"text")),
    ],
)
def test_status_lines_and_response_codes(line: bytes, expected: Status) -> None:
    assert parse_status(line) == expected


@pytest.mark.parametrize("line", [b"+OKAY", b"-ERROR x", b"OK", b"+ ", b"", b"* OK imap"])
def test_not_a_status_line(line: bytes) -> None:
    assert parse_status(line) is None


def test_describe_keeps_upstream_words_bounded_and_printable() -> None:
    status = Status(False, "AUTH", b"bad\x1b[31m " + b"x" * 500)
    text = status.describe()
    assert text.startswith("-ERR [AUTH] bad?[31m x")
    assert len(text) < 250
    assert "\x1b" not in text


def test_single_line_responses_in_one_chunk_come_one_at_a_time() -> None:
    parser = ResponseParser()
    parser.feed(b"+OK ready\r\n-ERR [IN-USE] locked\r\n")
    assert parser.next_event(Expect.SINGLE) == Status(True, None, b"ready")
    assert parser.buffered == len(b"-ERR [IN-USE] locked\r\n")
    assert parser.next_event(Expect.SINGLE) == Status(False, "IN-USE", b"locked")
    assert parser.next_event(Expect.SINGLE) is None


def test_status_line_split_anywhere() -> None:
    wire = b"-ERR [SYS/TEMP] later\r\n"
    for cut in range(len(wire) + 1):
        assert run_chunks([wire[:cut], wire[cut:]], Expect.SINGLE) == [
            Status(False, "SYS/TEMP", b"later")
        ]


def test_bare_lf_status_line_is_tolerated() -> None:
    assert run_chunks([b"+OK hi\n"], Expect.SINGLE) == [Status(True, None, b"hi")]


def test_bytes_wait_without_an_expectation() -> None:
    parser = ResponseParser()
    parser.feed(b"+OK early\r\n")
    assert parser.next_event(None) is None
    assert parser.next_event(Expect.SINGLE) == Status(True, None, b"early")


def test_unsolicited_flood_is_a_protocol_error() -> None:
    parser = ResponseParser(max_line=100)
    parser.feed(b"x" * 101)
    with pytest.raises(POP3ProtocolError):
        parser.next_event(None)


def test_overlong_status_line_is_a_protocol_error() -> None:
    parser = ResponseParser(max_line=100)
    parser.feed(b"+OK " + b"x" * 200)
    with pytest.raises(POP3ProtocolError):
        parser.next_event(Expect.SINGLE)


def test_garbage_is_a_protocol_error() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 400 Bad Request\r\n")
    with pytest.raises(POP3ProtocolError):
        parser.next_event(Expect.SINGLE)


# --- SASL continuations ---------------------------------------------------------------


def test_continuations_only_when_authenticating() -> None:
    parser = ResponseParser()
    parser.feed(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n+ \r\n+\r\n-ERR [AUTH] no\r\n")
    assert parser.next_event(Expect.SASL) == Continuation(b"eyJzdGF0dXMiOiI0MDEifQ==")
    assert parser.next_event(Expect.SASL) == Continuation(b"")
    assert parser.next_event(Expect.SASL) == Continuation(b"")
    assert parser.next_event(Expect.SASL) == Status(False, "AUTH", b"no")

    parser = ResponseParser()
    parser.feed(b"+ abc\r\n")
    with pytest.raises(POP3ProtocolError):
        parser.next_event(Expect.SINGLE)


def test_plus_ok_ends_a_sasl_exchange() -> None:
    assert run_chunks([b"+OK Logged in.\r\n"], Expect.SASL) == [Status(True, None, b"Logged in.")]


# --- multi-line bodies -----------------------------------------------------------------


def test_multi_line_err_has_no_body() -> None:
    parser = ResponseParser()
    parser.feed(b"-ERR no such message\r\n+OK next\r\n")
    assert parser.next_event(Expect.MULTI) == Status(False, None, b"no such message")
    assert not parser.in_body
    assert parser.next_event(Expect.SINGLE) == Status(True, None, b"next")


def test_empty_body() -> None:
    events = run_chunks([b"+OK 0 octets\r\n.\r\n"])
    assert events == [Status(True, None, b"0 octets"), BodyChunk(b"", True)]


def test_empty_body_split_everywhere() -> None:
    wire = b"+OK\r\n.\r\n"
    for cut in range(len(wire) + 1):
        events = run_chunks([wire[:cut], wire[cut:]])
        assert events[0] == Status(True, None, b"")
        assert body_of(events[1:]) == (b"", True)


def test_body_passes_through_verbatim_still_stuffed() -> None:
    body = b"Subject: x\r\n\r\n..leading dot\r\n...\r\nlast\r\n"
    events = run_chunks([b"+OK\r\n" + body + b".\r\n"])
    assert body_of(events[1:]) == (body, True)


def test_body_that_is_only_a_stuffed_dot_line() -> None:
    events = run_chunks([b"+OK\r\n..\r\n.\r\n"])
    assert body_of(events[1:]) == (b"..\r\n", True)


def test_terminator_split_at_every_offset_of_every_pair() -> None:
    body = stuff(b"a\r\n.\r\n..x\r\n\r\n.\r\nend")
    wire = b"+OK\r\n" + body + b".\r\n+OK after\r\n"
    for i in range(len(wire) + 1):
        for j in range(i, len(wire) + 1):
            parser, events = feed_one_response([wire[:i], wire[i:j], wire[j:]])
            assert body_of(events[1:]) == (body, True), (i, j)
            assert parser.next_event(Expect.SINGLE) == Status(True, None, b"after")


def test_byte_at_a_time() -> None:
    body = stuff(b".\r\n.\r\n\r\n..\r\nx")
    wire = b"+OK\r\n" + body + b".\r\n"
    events = run_chunks([wire[i : i + 1] for i in range(len(wire))])
    assert body_of(events[1:]) == (body, True)


def test_bytes_after_the_terminator_belong_to_the_next_response() -> None:
    parser = ResponseParser()
    parser.feed(b"+OK\r\nbody\r\n.\r\n+OK\r\n1 abc\r\n.\r\n-ERR")
    events = drain(parser, Expect.MULTI)
    assert body_of(events[1:]) == (b"body\r\n", True)
    # The rest is not interpreted until someone says what it answers.
    assert parser.buffered == len(b"+OK\r\n1 abc\r\n.\r\n-ERR")
    events = drain(parser, Expect.MULTI)
    assert body_of(events[1:]) == (b"1 abc\r\n", True)
    assert parser.next_event(Expect.SINGLE) is None
    parser.feed(b" gone\r\n")
    assert parser.next_event(Expect.SINGLE) == Status(False, None, b"gone")


def test_body_streams_without_accumulating() -> None:
    """A line of megabytes without a newline goes out as it comes in."""
    parser = ResponseParser()
    parser.feed(b"+OK\r\n")
    assert parser.next_event(Expect.MULTI) == Status(True, None, b"")
    chunk = b"x" * 65536
    total = 0
    for _ in range(64):  # 4 MiB, one line
        parser.feed(chunk)
        event = parser.next_event(Expect.MULTI)
        assert isinstance(event, BodyChunk)
        assert not event.last
        total += len(event.data)
        # Never more than a terminator's worth held back.
        assert 64 * 1024 * (_ + 1) - total <= 4
        assert parser.next_event(Expect.MULTI) is None
    parser.feed(b"\r\n.\r\n")
    last = parser.next_event(Expect.MULTI)
    assert isinstance(last, BodyChunk)
    assert last.last
    assert total + len(last.data) == 64 * 65536 + 2


def test_a_chunk_goes_on_uncopied() -> None:
    """A chunk that cannot end in the start of a terminator is passed on as it came."""
    parser = ResponseParser()
    parser.feed(b"+OK\r\n")
    assert parser.next_event(Expect.MULTI) == Status(True, None, b"")
    for chunk in (b"first line\r\nsecond", b" half\r\nthird line", b"\r\n.x\r\n" * 1000 + b"y"):
        parser.feed(chunk)
        event = parser.next_event(Expect.MULTI)
        assert isinstance(event, BodyChunk)
        assert event.data is chunk
        assert parser.next_event(Expect.MULTI) is None


@pytest.mark.parametrize(
    ("tail", "held"),
    [
        (b"x", b""),
        (b"\r", b"\r"),
        (b"\r\n", b"\r\n"),
        (b"\r\n.", b"\r\n."),
        (b"\r\n.\r", b"\r\n.\r"),
        (b"\n", b""),
        (b"\r\nx", b""),
        (b".\r", b"\r"),
        (b"\r\n..", b""),
        (b"\r\n\r", b"\r"),
    ],
)
def test_only_what_may_begin_a_terminator_is_held(tail: bytes, held: bytes) -> None:
    parser = ResponseParser()
    parser.feed(b"+OK\r\nsome text" + tail)
    assert parser.next_event(Expect.MULTI) == Status(True, None, b"")
    event = parser.next_event(Expect.MULTI)
    assert event == BodyChunk((b"some text" + tail)[: 9 + len(tail) - len(held)], False)
    # Whatever was held still ends up in the body, or in the terminator.
    parser.feed(b"\r\n.\r\n")
    wire = b"some text" + tail + b"\r\n.\r\n"
    assert isinstance(event, BodyChunk)
    rest, done = body_of(drain(parser, Expect.MULTI))
    assert (event.data + rest, done) == (wire[: wire.find(b"\r\n.\r\n") + 2], True)


def test_lf_only_lines_are_not_terminators() -> None:
    """Only CRLF.CRLF ends a body: a server speaking bare LF never ends early."""
    events = run_chunks([b"+OK\r\na\n.\nb\r\n.\r\n"])
    assert body_of(events[1:]) == (b"a\n.\nb\r\n", True)


_pieces = st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"a", b"xyz", b" "])
_messages = st.one_of(st.lists(_pieces, max_size=60).map(b"".join), st.binary(max_size=300))


@settings(max_examples=400, deadline=None)
@given(raw=_messages, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_property_any_message_any_chunking(raw: bytes, cuts: list[int]) -> None:
    body = stuff(raw)
    wire = b"+OK message follows\r\n" + body + b".\r\n+OK next\r\n"
    points = sorted({min(c, len(wire)) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    parser, events = feed_one_response(chunks)
    assert events[0] == Status(True, None, b"message follows")
    assert body_of(events[1:]) == (body, True)
    assert parser.next_event(Expect.SINGLE) == Status(True, None, b"next")


_blocks = st.sampled_from(
    [
        b"x" * 700,
        b"y" * 1500,
        b"z" * 3000,
        b".",
        b"..",
        b"\r\n",
        b"\r\n.",
        b"\r\n..",
        b"\r\n.\r\n",
        b"a.b.c.d.",
        b"\r\n.\r",
        b"\n.\r\n",
        b"w",
    ]
)


@settings(max_examples=500, deadline=None)
@given(buf=st.lists(_blocks, max_size=40).map(b"".join))
def test_terminator_search_is_bytes_find(buf: bytes) -> None:
    """The search that skips from dot to dot finds what `bytes.find` finds,
    where dots are sparse (memchr), dense (the fallback) or both."""
    assert find_terminator(buf) == buf.find(b"\r\n.\r\n")


@pytest.mark.parametrize(
    "buf",
    [
        b"a." * 5000 + b"\r\n.\r\n",  # dense dots: bytes.find takes over
        b"x" * 100_000 + b"\r\n.\r\n" + b"a." * 100,  # sparse: dot to dot
        b"\r\n..\r\n" * 40 + b"y" * 50_000 + b"\r\n.\r\n",  # dense first, sparse after
        b"z" * 50_000 + b"a." * 1000 + b"\r\n.\r\n",  # sparse first, dense after
        b"." * 70 + b"\r\n.\r\n",  # over the dots let through, then found at once
        b"a." * 5000,
    ],
)
def test_terminator_search_sparse_and_dense(buf: bytes) -> None:
    assert find_terminator(buf) == buf.find(b"\r\n.\r\n")


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.sampled_from(["base64", "text", "stuffed"]), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=8),
)
def test_property_large_bodies_in_large_chunks(parts: list[str], cuts: list[int]) -> None:
    """Bodies of tens of KiB, as a relay sees them: sparse and dense dots."""
    lines = {
        "base64": b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n"
        * 300,
        "text": b"A sentence. Another one... And a last one.\r\n" * 200,
        "stuffed": b".\r\n..\r\n.x\r\n" * 50,
    }
    body = stuff(b"".join(lines[p] for p in parts))
    wire = b"+OK\r\n" + body + b".\r\n+OK next\r\n"
    points = sorted({min(c, len(wire)) for c in cuts})
    chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    parser, events = feed_one_response(chunks)
    assert body_of(events[1:]) == (body, True)
    assert parser.next_event(Expect.SINGLE) == Status(True, None, b"next")


def test_listing_capabilities() -> None:
    caps = Capabilities.parse(b"CAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nSTLS\r\nsasl plain login\r\n")
    assert "STLS" in caps
    assert "stls" in caps
    assert caps.sasl == {"PLAIN", "LOGIN"}
    assert "PIPELINING" not in caps
    assert Capabilities().sasl == frozenset()
