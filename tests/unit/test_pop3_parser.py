"""The pure parts of the POP3 front end: line framing, commands, stuffing."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gateway.dotstuff import DotStuffer, stuff, unstuff
from gateway.pop3.parser import (
    BadCommand,
    Command,
    Line,
    LineReader,
    Overlong,
    parse_command,
    parse_message_number,
)


def test_lines_split_on_crlf_and_bare_lf_across_feeds() -> None:
    reader = LineReader()
    assert reader.feed(b"US") == []
    assert reader.feed(b"ER a\r\nSTAT\nNO") == [Line(b"USER a"), Line(b"STAT")]
    assert reader.feed(b"OP\r\n") == [Line(b"NOOP")]


def test_overlong_line_reported_once_and_discarded_to_its_end() -> None:
    reader = LineReader(max_line=10)
    assert reader.feed(b"x" * 11) == [Overlong()]
    assert reader.feed(b"x" * 50) == []
    assert reader.feed(b"x\r\nSTAT\r\n") == [Line(b"STAT")]
    assert reader.feed(b"y" * 11 + b"\r\n") == [Overlong()]


def test_discard_forgets_pipelined_input() -> None:
    reader = LineReader()
    reader.feed(b"partial")
    reader.discard()
    assert reader.feed(b"\r\n") == [Line(b"")]


def test_parse_command() -> None:
    assert parse_command(b"retr 1") == Command("RETR", ("1",), "1")
    assert parse_command(b"PASS  two words ") == Command("PASS", ("two", "words"), " two words ")
    assert parse_command(b"") == BadCommand("empty command")
    assert parse_command(b"A\x00B") == BadCommand("NUL byte in command")
    assert parse_command(b"LIST \x01") == BadCommand("control character in command")
    assert parse_command(b"\xff") == BadCommand("command is not valid UTF-8")
    assert parse_command(b"X" * 300) == BadCommand("command line too long")
    assert parse_command(b"RETRIEVE 1") == BadCommand("unknown command")


def test_message_numbers() -> None:
    assert parse_message_number("3", 5) == 3
    assert parse_message_number("0003", 5) == 3
    assert parse_message_number("0", 5) == "no such message"
    assert parse_message_number("6", 5) == "no such message"
    assert parse_message_number("9" * 5000, 5) == "no such message"
    assert parse_message_number("-1", 5) == "invalid message number"
    assert parse_message_number("x", 5) == "invalid message number"
    assert parse_message_number("\u0661", 5) == "invalid message number"


def test_stuffing_examples() -> None:
    assert stuff(b".\r\n") == b"..\r\n"
    assert stuff(b"a\r\n.b\r\n..\r\n") == b"a\r\n..b\r\n...\r\n"
    assert stuff(b"no final newline") == b"no final newline\r\n"
    assert stuff(b"") == b""


@given(
    message=st.lists(st.sampled_from([b".", b"a", b"\r\n", b"..", b"\r\n."]), max_size=40).map(
        b"".join
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10),
)
def test_stuffing_is_exact_at_every_chunk_boundary(message: bytes, cuts: list[int]) -> None:
    stuffer = DotStuffer()
    bounds = sorted({0, len(message), *(c % (len(message) + 1) for c in cuts)})
    wire = b"".join(stuffer.feed(message[a:b]) for a, b in itertools.pairwise(bounds))
    wire += stuffer.close()
    assert wire == stuff(message)
    assert b"\r\n.\r\n" not in b"\r\n" + wire
    if message.endswith(b"\r\n") or not message:
        assert unstuff(wire) == message
