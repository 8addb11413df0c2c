"""The IMAP response parser and the pure helpers around it: bytes in, events out.

The property that matters most: a message literal comes out byte for byte
whatever the network's chunking, and never sits whole in memory.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.upstream.imap.commands import (
    Literal,
    astring,
    encode_mailbox,
    uid_sets,
    wire_pieces,
)
from gateway.upstream.imap.parser import (
    STREAMED,
    Continuation,
    IMAPProtocolError,
    LiteralData,
    LiteralStart,
    Response,
    ResponseParser,
    parse_values,
)
from gateway.upstream.imap.responses import (
    Capabilities,
    parse_fetch,
    parse_search,
    parse_status,
)


def events(parser: ResponseParser, data: bytes = b"", stream: bool = False) -> list[object]:
    if data:
        parser.feed(data)
    out: list[object] = []
    while (event := parser.next_event(stream)) is not None:
        out.append(event)
    return out


def fetch_body(message: bytes, tag: bytes = b"g7") -> bytes:
    return (
        b"* 12 FETCH (UID 34 BODY[] {%d}\r\n" % len(message)
        + message
        + b" FLAGS (\\Seen))\r\n"
        + tag
        + b" OK Fetch completed.\r\n"
    )


def collect_streamed(parser: ResponseParser, chunks: list[bytes]) -> tuple[bytes, list[object]]:
    """Feed chunk by chunk; return the streamed literal and the other events."""
    body = bytearray()
    others: list[object] = []
    started = ended = 0
    for chunk in chunks:
        for event in events(parser, chunk, stream=True):
            if isinstance(event, LiteralStart):
                started += 1
            elif isinstance(event, LiteralData):
                assert started and not ended
                body += event.data
                ended += event.last
            else:
                others.append(event)
    assert started == ended == 1
    return bytes(body), others


# --- status responses and greetings ---------------------------------------------------


def test_greeting_with_capabilities() -> None:
    (greeting,) = events(ResponseParser(), b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] hi\r\n")
    assert isinstance(greeting, Response) and greeting.tag is None
    status = parse_status(greeting)
    assert status is not None and status.ok and status.code == "CAPABILITY"
    caps = Capabilities.parse(status.code_data)
    assert "sasl-ir" in caps and caps.sasl == {"PLAIN"}


@pytest.mark.parametrize(
    ("line", "condition", "code", "data", "text"),
    [
        (b"g1 OK done", "OK", None, b"", b"done"),
        (
            b"g1 NO [AUTHENTICATIONFAILED] Authentication failed.",
            "NO",
            "AUTHENTICATIONFAILED",
            b"",
            b"Authentication failed.",
        ),
        (b"g2 bad [BADCHARSET (UTF-8)] no", "BAD", "BADCHARSET", b"(UTF-8)", b"no"),
        (
            b"* OK [UIDVALIDITY 1795303440] UIDs valid",
            "OK",
            "UIDVALIDITY",
            b"1795303440",
            b"UIDs valid",
        ),
        (b"* BYE Logging out", "BYE", None, b"", b"Logging out"),
        (b"g3 OK", "OK", None, b"", b""),
    ],
)
def test_status_responses(
    line: bytes, condition: str, code: str | None, data: bytes, text: bytes
) -> None:
    (response,) = events(ResponseParser(), line + b"\r\n")
    status = parse_status(response)  # type: ignore[arg-type]
    assert status is not None
    assert (status.condition, status.code, status.code_data, status.text) == (
        condition,
        code,
        data,
        text,
    )


def test_data_responses_are_not_status() -> None:
    for line in (b"* 3 EXISTS", b"* SEARCH 1 2", b"* CAPABILITY IMAP4rev1", b"g1 BYE x"):
        (response,) = events(ResponseParser(), line + b"\r\n")
        assert parse_status(response) is None  # type: ignore[arg-type]


def test_describe_keeps_upstream_words_printable_and_short() -> None:
    (response,) = events(ResponseParser(), b"g1 NO [ALERT] \x1b[31mred " + b"x" * 300 + b"\r\n")
    described = parse_status(response).describe()  # type: ignore[union-attr,arg-type]
    assert "\x1b" not in described and described.endswith("...") and len(described) < 230


@pytest.mark.parametrize(
    ("line", "text"),
    [(b"+ ", b""), (b"+", b""), (b"+ eyJzdGF0dXMiOiI0MDEifQ==", b"eyJzdGF0dXMiOiI0MDEifQ==")],
)
def test_continuations(line: bytes, text: bytes) -> None:
    assert events(ResponseParser(), line + b"\r\n") == [Continuation(text)]


def test_bare_lf_and_several_responses_in_one_read() -> None:
    out = events(ResponseParser(), b"* 2 EXISTS\n* 1 RECENT\r\ng1 OK x\r\n")
    assert [r.first_line for r in out] == [b"* 2 EXISTS", b"* 1 RECENT", b"g1 OK x"]  # type: ignore[attr-defined]
    assert out[2].tag == b"g1"  # type: ignore[attr-defined]


@pytest.mark.parametrize("junk", [b"\r\n", b"garbage\r\n"])
def test_not_imap(junk: bytes) -> None:
    with pytest.raises(IMAPProtocolError):
        events(ResponseParser(), junk)


# --- literals ------------------------------------------------------------------------------


def test_small_literals_are_collected_inline() -> None:
    data = (
        b'* 1 FETCH (UID 7 INTERNALDATE "21-Nov-2026 23:23:58 +0000" '
        b"BODY[HEADER.FIELDS (MESSAGE-ID)] {21}\r\nMessage-ID: <0@x>\r\n\r\n)\r\n"
    )
    (response,) = events(ResponseParser(), data, stream=False)
    seq, items = parse_fetch(response)  # type: ignore[arg-type]
    assert seq == 1
    assert items == {
        "UID": "7",
        "INTERNALDATE": b"21-Nov-2026 23:23:58 +0000",
        "BODY[HEADER.FIELDS (MESSAGE-ID)]": b"Message-ID: <0@x>\r\n\r\n",
    }


def test_body_literal_streams_and_the_response_records_it() -> None:
    message = b"From: a\r\n\r\n{5}\r\n)\r\ng7 OK fake\r\n"
    body, others = collect_streamed(ResponseParser(), [fetch_body(message)])
    assert body == message
    response, tagged = others
    _, items = parse_fetch(response)  # type: ignore[arg-type]
    assert items == {"UID": "34", "BODY[]": STREAMED, "FLAGS": ["\\Seen"]}
    assert tagged.tag == b"g7"  # type: ignore[attr-defined]


def test_literal_split_at_every_offset() -> None:
    message = b"Subject: x\r\n\r\n.dot\r\n{3}\r\n" + bytes(range(256)) + b"\r\nend\r\n"
    wire = fetch_body(message)
    for cut in range(len(wire) + 1):
        body, others = collect_streamed(ResponseParser(), [wire[:cut], wire[cut:]])
        assert body == message, cut
        assert [type(e) for e in others] == [Response, Response]


@settings(max_examples=200, deadline=None)
@given(
    message=st.binary(max_size=3000),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
)
def test_literal_survives_any_chunking(message: bytes, cuts: list[int]) -> None:
    wire = fetch_body(message)
    points = sorted({c for c in cuts if c < len(wire)})
    chunks = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    body, others = collect_streamed(ResponseParser(), chunks)
    assert body == message
    assert [getattr(e, "tag", None) for e in others] == [None, b"g7"]


def test_empty_literal() -> None:
    body, others = collect_streamed(ResponseParser(), [fetch_body(b"")])
    assert body == b"" and len(others) == 2


def test_partial_fetch_literal_streams_too() -> None:
    parser = ResponseParser()
    out = events(parser, b"* 2 FETCH (UID 2 BODY[]<0> {3}\r\nabc)\r\n", stream=True)
    assert out[0] == LiteralStart(b"* 2 FETCH (UID 2 BODY[]<0> {3}", 3)
    assert out[1] == LiteralData(b"abc", True)


def test_streamed_chunks_are_slices_of_what_arrived() -> None:
    """Memory stays at one network read: nothing accumulates while a body streams."""
    parser = ResponseParser()
    size = 10 * 1024 * 1024
    chunk = b"x" * 65536
    head = events(parser, b"* 1 FETCH (BODY[] {%d}\r\n" % size, stream=True)
    assert head == [LiteralStart(b"* 1 FETCH (BODY[] {%d}" % size, size)]
    total = 0
    for _ in range(size // len(chunk)):
        parser.feed(chunk)
        event = parser.next_event(True)
        assert isinstance(event, LiteralData) and event.data is chunk
        assert parser.next_event(True) is None
        assert parser.buffered == 0
        total += len(event.data)
    assert total == size
    assert events(parser, b")\r\n", stream=True)[0].literals == (STREAMED,)  # type: ignore[attr-defined]


def test_body_literal_is_inline_when_not_streaming() -> None:
    (response,) = events(ResponseParser(), fetch_body(b"abc"), stream=False)[:1]
    assert parse_fetch(response)[1]["BODY[]"] == b"abc"  # type: ignore[arg-type]


# --- limits ----------------------------------------------------------------------------------


def test_line_limit() -> None:
    parser = ResponseParser(max_line=100)
    parser.feed(b"* " + b"x" * 98)
    assert parser.next_event() is None
    parser.feed(b"x")
    with pytest.raises(IMAPProtocolError, match="longer than 100"):
        parser.next_event()


def test_inline_literal_limit() -> None:
    parser = ResponseParser(max_literal=10)
    with pytest.raises(IMAPProtocolError, match="at most 10"):
        events(parser, b"* 1 FETCH (BODY[HEADER] {11}\r\n")


def test_response_limit_counts_lines_and_literals() -> None:
    parser = ResponseParser(max_literal=100, max_response=150)
    with pytest.raises(IMAPProtocolError, match="larger than 150"):
        events(parser, b'* LIST () "/" {100}\r\n' + b"a" * 100 + b" {100}\r\n")


def test_a_large_streamed_literal_is_not_limited() -> None:
    parser = ResponseParser(max_literal=10, max_response=100)
    assert events(parser, b"* 1 FETCH (BODY[] {1000000}\r\n", stream=True)[0] == LiteralStart(
        b"* 1 FETCH (BODY[] {1000000}", 1000000
    )


# --- reading values ---------------------------------------------------------------------------


def test_values_atoms_strings_nil_lists() -> None:
    (response,) = events(
        ResponseParser(),
        b'* 5 FETCH (FLAGS (\\Seen $POP3Deleted) X "a \\"q\\" \\\\ b" Y NIL '
        b"BODY[HEADER.FIELDS (A B)]<0> {2}\r\nhi)\r\n",
    )
    assert parse_values(response) == [  # type: ignore[arg-type]
        "5",
        "FETCH",
        [
            "FLAGS",
            ["\\Seen", "$POP3Deleted"],
            "X",
            b'a "q" \\ b',
            "Y",
            None,
            "BODY[HEADER.FIELDS (A B)]<0>",
            b"hi",
        ],
    ]


@pytest.mark.parametrize("line", [b"* 1 FETCH (UID 1", b"* 1 FETCH UID 1)", b"* 1 FETCH (A {x}"])
def test_malformed_values(line: bytes) -> None:
    (response,) = events(ResponseParser(), line + b"\r\n")
    with pytest.raises(IMAPProtocolError):
        parse_fetch(response)  # type: ignore[arg-type]


def test_search() -> None:
    (response,) = events(ResponseParser(), b"* SEARCH 3 17 4000000000\r\n")
    assert parse_search(response) == [3, 17, 4000000000]  # type: ignore[arg-type]
    (empty,) = events(ResponseParser(), b"* SEARCH\r\n")
    assert parse_search(empty) == []  # type: ignore[arg-type]


# --- writing commands -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "wire"),
    [
        ("INBOX", b"INBOX"),
        ("Entwürfe", b"Entw&APw-rfe"),
        ("A&B", b"A&-B"),
        ("~peter/mail/台北/日本語", b"~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 5.1.3
    ],
)
def test_modified_utf7_folder_names(name: str, wire: bytes) -> None:
    assert encode_mailbox(name) == wire


def test_astring() -> None:
    assert astring(b'pa"ss\\word') == b'"pa\\"ss\\\\word"'
    assert astring("pässword".encode()) == Literal("pässword".encode())
    assert astring(b"two\r\nlines") == Literal(b"two\r\nlines")
    with pytest.raises(ValueError):
        astring(b"nul\0")


def test_literals_on_the_wire() -> None:
    args = [b'"user"', Literal(b"p\xc3\xa4ss")]
    assert wire_pieces(b"g1", b"LOGIN", args, Capabilities.parse(b"LITERAL+")) == [
        b'g1 LOGIN "user" {5+}\r\np\xc3\xa4ss\r\n'
    ]
    assert wire_pieces(b"g1", b"LOGIN", args, Capabilities()) == [
        b'g1 LOGIN "user" {5}\r\n',
        b"p\xc3\xa4ss\r\n",
    ]


def test_uid_sets() -> None:
    assert uid_sets([5, 1, 2, 3, 9, 10, 12, 3]) == [b"1:3,5,9:10,12"]
    assert uid_sets([]) == []
    many = uid_sets(range(1, 2000, 2), max_length=100)
    assert all(len(s) <= 100 for s in many)
    joined = [int(x) for s in many for x in s.split(b",")]
    assert joined == list(range(1, 2000, 2))
