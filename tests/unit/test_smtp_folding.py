"""Folding long lines (`gateway.smtp.folding`), alone and at intake."""

from __future__ import annotations

import itertools
import re
import tracemalloc
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import Account
from gateway.smtp.folding import FOLD, LineFolder
from tests.helpers.log_lines import captured_log
from tests.unit.test_smtp_server import Gateway


def reference(data: bytes, limit: int) -> list[bytes]:
    """The message cut where Postfix's rule puts a fold, one octet at a time:
    a fold goes before an octet of content that finds its physical line
    already `limit` octets long. LF ends a line, with a CR right before it."""
    pieces: list[bytes] = []
    start = column = 0
    i = 0
    while i < len(data):
        if data[i] == 0x0A or data[i : i + 2] == b"\r\n":
            column = 0
            i += 1 if data[i] == 0x0A else 2
            continue
        if column == limit:
            pieces.append(data[start:i])
            start, column = i, 1  # the inserted space
        column += 1
        i += 1
    pieces.append(data[start:])
    return pieces


def fold_in_chunks(data: bytes, cuts: list[int], limit: int) -> tuple[bytes, int]:
    folder = LineFolder(limit)
    bounds = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    out = [folder.feed(data[a:b]) for a, b in itertools.pairwise(bounds)]
    out.append(folder.close())
    return b"".join(out), folder.folds


def physical_lines(data: bytes) -> list[bytes]:
    """Each line's content, without its LF or CRLF end."""
    return [line.removesuffix(b"\r") for line in data.split(b"\n")]


def blank_line(data: bytes) -> int:
    """Where the header/body boundary (the first empty line) is, or -1."""
    found = re.search(rb"(?:^|\n)\r?\n", data)
    return -1 if found is None else found.start()


# Octets that make line ends, near-misses and MIME-looking lines likely.
message_bytes = st.lists(
    st.one_of(
        st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b".", b"-", b"\r\n\r\n", b"\xc3\xa9"]),
        st.binary(max_size=3),
        st.integers(1, 60).map(lambda n: b"x" * n),
    ),
    max_size=60,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(message_bytes, st.lists(st.integers(0, 10_000), max_size=12), st.integers(2, 12))
def test_folding_at_any_chunk_boundaries(data: bytes, cuts: list[int], limit: int) -> None:
    out, folds = fold_in_chunks(data, cuts, limit)
    pieces = reference(data, limit)
    # Removing each inserted CRLF SPACE gives the input back, byte for byte.
    assert b"".join(pieces) == data
    assert out == FOLD.join(pieces) and folds == len(pieces) - 1
    # No line over the limit; a fold only where a line was full.
    assert all(len(line) <= limit for line in physical_lines(out))
    for n in range(1, len(pieces)):
        assert len(physical_lines(FOLD.join(pieces[:n]) + b"\r\n")[-2]) == limit
    # The header/body boundary is where it was: every fold before it lies in the header.
    boundary = blank_line(data)
    if boundary >= 0:
        before = len(b"".join(pieces[:1]))
        header_folds = 0
        for piece in pieces[1:]:
            if before > boundary:
                break
            header_folds += 1
            before += len(piece)
        assert blank_line(out) == boundary + len(FOLD) * header_folds
    else:
        assert blank_line(out) == -1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    st.lists(st.integers(0, 20_000), max_size=8),
)
def test_folding_at_998_octets(lengths: list[int], cuts: list[int]) -> None:
    data = b"Subject: x\r\n\r\n" + b"".join(b"y" * n + b"\r\n" for n in lengths)
    out, _ = fold_in_chunks(data, cuts, 998)
    assert out == FOLD.join(reference(data, 998))
    assert max(map(len, physical_lines(out))) <= 998


def test_postfix_rule_at_the_limit() -> None:
    folder = LineFolder(998)
    # 998 octets before CRLF: untouched.
    assert folder.feed(b"a" * 998 + b"\r\n") == b"a" * 998 + b"\r\n"
    # 999: 998, CRLF SPACE, the last octet; continuations hold 997 octets.
    assert folder.feed(b"b" * 999 + b"\r\n") == b"b" * 998 + b"\r\n b\r\n"
    assert folder.feed(b"c" * (998 + 997 + 1) + b"\r\n") == (
        b"c" * 998 + b"\r\n " + b"c" * 997 + b"\r\n c\r\n"
    )
    assert folder.folds == 3


def test_a_cr_at_the_limit_waits_for_the_next_chunk() -> None:
    folder = LineFolder(4)
    assert folder.feed(b"abcd\r") == b"abcd"
    assert folder.feed(b"\nefgh\r") == b"\r\nefgh"
    assert folder.feed(b"i") == b"\r\n \ri"
    assert folder.feed(b"j\r") == b"j"
    # A CR that ends the message is content: the line is full, so it is folded too.
    assert folder.close() == b"\r\n \r"
    assert folder.folds == 2


def test_a_100_mib_line_is_folded_in_bounded_memory() -> None:
    folder = LineFolder(998)
    chunk = b"z" * 65536
    total = 100 * 1024 * 1024
    written = 0
    tracemalloc.start()
    try:
        for _ in range(total // len(chunk)):
            out = folder.feed(chunk)
            written += len(out)
            assert len(out) < 2 * len(chunk)
        written += len(folder.feed(b"\r\n"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # What is held between chunks is a column count: the peak is a few chunks.
    assert peak < 1024 * 1024
    assert written == total + len(FOLD) * folder.folds + 2
    assert folder.folds == (total - 998 + 996) // 997


def test_short_lines_pass_unchanged_in_one_piece() -> None:
    folder = LineFolder(998)
    chunk = b"".join(b"line %d\r\n" % i for i in range(5000))
    assert folder.feed(chunk) is chunk
    assert folder.folds == 0


# -- at intake, through the SMTP front end ------------------------------------------


def submit(gw: Gateway, *chunks: bytes) -> bytes:
    client = gw.connect()
    client.login()
    client.send(b"MAIL FROM:<a@scan.example.com>", b"RCPT TO:<x@example.org>", b"DATA")
    for chunk in chunks:
        assert client.raw(chunk) == b""
    return client.send(b".")


def test_a_long_line_is_folded_by_default_and_the_message_queued(tmp_path: Path) -> None:
    gw = Gateway(tmp_path, max_size=1_000_000)
    body = b"A" * 100 * 1024
    message = b"Subject: long\r\n\r\n" + body + b"\r\n.leading dot\r\n"
    wire = message.replace(b"\r\n.", b"\r\n..")
    with captured_log() as events:
        # Cut mid-line and right after the header's last CR.
        cut = wire.index(b"\r\n\r\n") + 1
        reply = submit(gw, wire[:cut], wire[cut:70_000], wire[70_000:])
    assert reply.startswith(b"250 2.0.0 OK queued as ")
    stored = gw.message(gw.queued[0])
    assert stored == FOLD.join(reference(message, 998))
    assert stored.replace(FOLD, b"") == message
    assert max(map(len, physical_lines(stored))) == 998
    # The envelope's size is the stored message's (what the relay declares as SIZE=).
    assert gw.queued[0].envelope.size == len(stored)
    assert any("folded with CRLF SPACE" in line for line in events), events


def test_long_lines_refuse_keeps_todays_554(tmp_path: Path) -> None:
    gw = Gateway(tmp_path)
    gw.factory.long_lines = "refuse"
    reply = submit(gw, b"x" * 999 + b"\r\n")
    assert reply == b"554 5.6.0 message has a line longer than 998 octets (RFC 5321 4.5.3.1.6)\r\n"
    assert gw.queued == []


def test_folding_after_the_from_rewrite(tmp_path: Path) -> None:
    account = Account(
        "scanner",
        "corp",
        "scanner@example.com",
        allowed_senders=("*@scan.example.com",),
        rewrite_from_header=True,
    )
    gw = Gateway(tmp_path, account=account)
    long_from = b"From: " + b"n" * 1500 + b" <a@scan.example.com>\r\n"
    reply = submit(gw, long_from + b"X-Long: " + b"h" * 1200 + b"\r\n\r\nbody\r\n")
    assert reply.startswith(b"250")
    stored = gw.message(gw.queued[0])
    assert stored.startswith(b"From: ") and b"<scanner@example.com>\r\n" in stored
    assert stored.endswith(b"\r\n\r\nbody\r\n")
    assert max(map(len, physical_lines(stored))) <= 998
