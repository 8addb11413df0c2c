"""The pure SMTP input parser: command framing, data framing and un-stuffing."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.dotstuff import DotStuffer
from gateway.smtp.parser import (
    MAX_LINE,
    BadCommand,
    Command,
    DataChunk,
    Line,
    LineMeter,
    Overlong,
    PathCommand,
    PathError,
    SMTPInput,
    address_problem,
    parse_command,
    parse_path_command,
)


def lines(reader: SMTPInput) -> list[Line | Overlong]:
    out = []
    while (event := reader.next_line()) is not None:
        out.append(event)
    return out


def read_data(reader: SMTPInput) -> tuple[bytes, bool]:
    out = []
    while (chunk := reader.next_data()) is not None:
        out.append(chunk.data)
        if chunk.end:
            return b"".join(out), True
    return b"".join(out), False


def test_lines_crlf_and_bare_lf() -> None:
    reader = SMTPInput()
    reader.feed(b"EHLO a\r\nNOOP\nQU")
    assert lines(reader) == [Line(b"EHLO a"), Line(b"NOOP")]
    reader.feed(b"IT\r\n")
    assert lines(reader) == [Line(b"QUIT")]


def test_overlong_line_reported_once_and_rest_skipped() -> None:
    reader = SMTPInput()
    reader.feed(b"X" * (MAX_LINE + 10))
    assert lines(reader) == [Overlong()]
    reader.feed(b"Y" * 5000 + b"\r\nNOOP\r\n")
    assert lines(reader) == [Line(b"NOOP")]


def test_overlong_complete_line() -> None:
    reader = SMTPInput(max_line=10)
    reader.feed(b"A" * 11 + b"\r\nNOOP\r\n")
    assert lines(reader) == [Overlong(), Line(b"NOOP")]


def test_discard_forgets_pipelined_plaintext() -> None:
    reader = SMTPInput()
    reader.feed(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert reader.next_line() == Line(b"STARTTLS")
    reader.discard()
    assert reader.next_line() is None
    assert reader.buffered == 0


def test_data_mode_starts_right_after_the_data_line() -> None:
    reader = SMTPInput()
    reader.feed(b"DATA\r\nSubject: x\r\n\r\nQUIT\r\n.\r\nNOOP\r\n")
    assert reader.next_line() == Line(b"DATA")
    reader.start_data()
    body, end = read_data(reader)
    assert end and body == b"Subject: x\r\n\r\nQUIT\r\n"
    assert lines(reader) == [Line(b"NOOP")]


def test_empty_message() -> None:
    reader = SMTPInput()
    reader.start_data()
    reader.feed(b".\r\nQUIT\r\n")
    assert read_data(reader) == (b"", True)
    assert lines(reader) == [Line(b"QUIT")]


def test_unstuffing_first_line_and_later_lines() -> None:
    reader = SMTPInput()
    reader.start_data()
    reader.feed(b"..first\r\nmid\r\n..\r\n...x\r\n.\r\n")
    assert read_data(reader) == (b".first\r\nmid\r\n.\r\n..x\r\n", True)


def test_only_crlf_dot_crlf_ends_the_data() -> None:
    # LF.LF, CR.CR and LF.CRLF are not the end (SMTP smuggling); a line of
    # any length stays data.
    reader = SMTPInput()
    reader.start_data()
    body = b"a\n.\nb\r.\rc\n.\r\nd" + b"z" * 100_000 + b"\r\n"
    reader.feed(body + b".\r\n")
    assert read_data(reader) == (body, True)


def test_overlong_data_line_never_becomes_commands() -> None:
    reader = SMTPInput()
    reader.start_data()
    reader.feed(b"x" * (5 * MAX_LINE))
    data, end = read_data(reader)
    assert not end and len(data) > 4 * MAX_LINE
    reader.feed(b"\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n.\r\n")
    rest, end = read_data(reader)
    assert end and rest.endswith(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
            st.sampled_from([b".", b"..", b". ", b".x", b""]),
        ),
        max_size=30,
    ),
    st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=50),
)
def test_round_trip_at_every_chunk_boundary(body_lines: list[bytes], cuts: list[int]) -> None:
    """Stuffed with the relay's own DotStuffer and cut anywhere, the data comes back."""
    message = b"".join(line + b"\r\n" for line in body_lines)
    stuffer = DotStuffer()
    wire = stuffer.feed(message) + stuffer.close() + b".\r\nNOOP\r\n"
    reader = SMTPInput()
    reader.start_data()
    got: list[bytes] = []
    ended = False
    pos = 0
    sizes = iter(cuts * (len(wire) // len(cuts) + 1))
    while pos < len(wire) and not ended:
        step = next(sizes)
        reader.feed(wire[pos : pos + step])
        pos += step
        while (chunk := reader.next_data()) is not None:
            got.append(chunk.data)
            if chunk.end:
                ended = True
                break
    if not ended:
        reader.feed(wire[pos:])
        data, ended = read_data(reader)
        got.append(data)
    else:
        reader.feed(wire[pos:])
    assert ended
    assert b"".join(got) == message
    assert lines(reader) == [Line(b"NOOP")]


def test_data_chunk_type() -> None:
    reader = SMTPInput()
    reader.start_data()
    reader.feed(b"hello world\r\n")
    chunk = reader.next_data()
    assert isinstance(chunk, DataChunk) and not chunk.end and b"hello" in chunk.data


# -- line meter --------------------------------------------------------------


def test_line_meter_across_chunks() -> None:
    meter = LineMeter()
    meter.feed(b"abc\r\n" + b"x" * 500)
    assert meter.longest == 500
    meter.feed(b"y" * 600)
    assert meter.longest == 1100
    meter.feed(b"\r\nshort\r\n")
    assert meter.longest == 1101  # the CR counts


def test_line_meter_middle_lines() -> None:
    meter = LineMeter()
    meter.feed(b"a\r\n" + b"m" * 2000 + b"\r\nb\r\n")
    assert meter.longest == 2001


# -- commands ------------------------------------------------------------------


def test_parse_command() -> None:
    assert parse_command(b"ehlo  printer.local ") == Command("EHLO", "printer.local")
    assert parse_command(b"MAIL FROM:<a@b> SIZE=10") == Command("MAIL", "FROM:<a@b> SIZE=10")
    assert isinstance(parse_command(b""), BadCommand)
    assert isinstance(parse_command(b"MAIL FROM:<\xc3\xa9@x>"), BadCommand)
    assert isinstance(parse_command(b"NOOP\x00"), BadCommand)
    assert isinstance(parse_command(b"X" * 600), BadCommand)


def test_parse_mail_from() -> None:
    assert parse_path_command("FROM:<a@b.example> SIZE=100 BODY=8BITMIME", "FROM") == (
        PathCommand("a@b.example", {"SIZE": "100", "BODY": "8BITMIME"})
    )
    assert parse_path_command("FROM:<>", "FROM") == PathCommand("", {})
    # Sloppy devices: a space after the colon, no brackets.
    assert parse_path_command("from: <a@b.example>", "FROM") == PathCommand("a@b.example", {})
    assert parse_path_command("FROM:a@b.example", "FROM") == PathCommand("a@b.example", {})
    # Source routes are ignored (RFC 5321 4.1.2).
    assert parse_path_command("TO:<@relay.example:c@d.example>", "TO") == PathCommand(
        "c@d.example", {}
    )
    assert parse_path_command('TO:<"john doe"@d.example>', "TO") == PathCommand(
        '"john doe"@d.example', {}
    )


def test_parse_path_errors() -> None:
    assert isinstance(parse_path_command("TO:<>", "TO"), PathError)
    assert isinstance(parse_path_command("FROM:<a@b", "FROM"), PathError)
    assert isinstance(parse_path_command("TO:<a@b>", "FROM"), PathError)
    assert isinstance(parse_path_command("FROM:<a@b>x", "FROM"), PathError)
    assert isinstance(parse_path_command("FROM:<a@b> SIZE=", "FROM"), PathError)
    assert isinstance(parse_path_command("TO:<nodomain>", "TO"), PathError)


def test_address_problems() -> None:
    assert address_problem("a@b.example", null_ok=False) is None
    assert address_problem("a@[192.0.2.1]", null_ok=False) is None
    assert address_problem("", null_ok=True) is None
    assert address_problem("", null_ok=False)
    assert address_problem("a b@c.example", null_ok=False)
    assert address_problem("a@-bad_domain!", null_ok=False)
    assert address_problem("a@" + "x" * 260, null_ok=False)
