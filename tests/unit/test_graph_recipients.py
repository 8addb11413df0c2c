"""The To/Cc/Bcc rewrite before a Graph send: headers end up naming exactly
the envelope's pending recipients, and nothing else in the message changes."""

from __future__ import annotations

from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses

from hypothesis import given
from hypothesis import strategies as st

from gateway.smtp.graph_recipients import match_envelope

BODY = b"\r\nline one\r\nTo: not-a-header@example.org\r\n"


def named(message: bytes) -> list[str]:
    headers = BytesHeaderParser(policy=compat32).parsebytes(message)
    values = [str(v) for name in ("to", "cc", "bcc") for v in headers.get_all(name, [])]
    return sorted(a.lower() for _, a in getaddresses(values) if a)


def test_matching_headers_are_left_byte_for_byte() -> None:
    message = (
        b"From: Scanner <scan@example.com>\r\nTo: A <a@example.org>,\r\n b@example.org\r\n"
        b"Cc: c@example.org\r\nSubject: x\r\n" + BODY
    )
    rewrite = match_envelope(message, ["a@example.org", "B@example.org", "c@example.org"])
    assert rewrite.message == message and not rewrite.changed


def test_envelope_only_recipients_become_bcc() -> None:
    message = b"From: s@example.com\r\nTo: a@example.org\r\nSubject: x\r\n" + BODY
    rewrite = match_envelope(message, ["a@example.org", "hidden@example.net"])
    assert rewrite.message == (
        b"From: s@example.com\r\nTo: a@example.org\r\nSubject: x\r\n"
        b"Bcc: <hidden@example.net>\r\n" + BODY
    )
    assert rewrite.added_bcc == ["hidden@example.net"] and rewrite.dropped == []


def test_header_only_recipients_are_dropped_names_kept() -> None:
    message = (
        b'From: s@example.com\r\nTo: "Doe, Ann" <ann@example.org>, other@example.org\r\n'
        b"Cc: cc-only@example.org\r\nSubject: x\r\n" + BODY
    )
    rewrite = match_envelope(message, ["ann@example.org"])
    assert rewrite.message == (
        b'From: s@example.com\r\nTo: "Doe, Ann" <ann@example.org>\r\nSubject: x\r\n' + BODY
    )
    assert rewrite.dropped == ["other@example.org", "cc-only@example.org"]


def test_bcc_fields_are_replaced_by_the_envelope() -> None:
    message = (
        b"From: s@example.com\r\nTo: a@example.org\r\nBcc: gone@example.org,\r\n"
        b" kept@example.org\r\nSubject: x\r\n" + BODY
    )
    rewrite = match_envelope(message, ["a@example.org", "kept@example.org"])
    assert rewrite.message == (
        b"From: s@example.com\r\nTo: a@example.org\r\nSubject: x\r\n"
        b"Bcc: <kept@example.org>\r\n" + BODY
    )
    assert rewrite.removed_bcc


def test_no_recipient_headers_and_bare_lf() -> None:
    message = b"Subject: scan\nX-Device: printer\n\nbody\n"
    rewrite = match_envelope(message, ["a@example.org", "b@example.org"])
    assert rewrite.message == (
        b"Subject: scan\nX-Device: printer\nBcc: <a@example.org>,\n <b@example.org>\n\nbody\n"
    )


def test_header_only_message_without_a_final_line_end() -> None:
    rewrite = match_envelope(b"Subject: x", ["a@example.org"])
    assert rewrite.message == b"Subject: x\r\nBcc: <a@example.org>\r\n"


def test_group_without_addresses_is_kept() -> None:
    message = b"To: undisclosed-recipients:;\r\nSubject: x\r\n" + BODY
    rewrite = match_envelope(message, ["a@example.org"])
    assert rewrite.message == (
        b"To: undisclosed-recipients:;\r\nSubject: x\r\nBcc: <a@example.org>\r\n" + BODY
    )


def test_eight_bit_display_names_survive_a_rewrite() -> None:
    message = "To: Jürgen <j@example.org>, x@example.org\r\n".encode() + BODY
    rewrite = match_envelope(message, ["j@example.org"])
    assert rewrite.message == "To: Jürgen <j@example.org>\r\n".encode() + BODY


addresses = st.sampled_from([f"u{n}@example.org" for n in range(6)])


@given(
    to=st.lists(addresses, max_size=4),
    cc=st.lists(addresses, max_size=3),
    bcc=st.lists(addresses, max_size=3),
    envelope=st.lists(addresses, min_size=1, max_size=5, unique=True),
)
def test_headers_name_exactly_the_envelope(
    to: list[str], cc: list[str], bcc: list[str], envelope: list[str]
) -> None:
    lines = [b"From: s@example.com\r\n"]
    for name, values in ((b"To", to), (b"Cc", cc), (b"Bcc", bcc)):
        if values:
            lines.append(name + b": " + ", ".join(values).encode() + b"\r\n")
    message = b"".join(lines) + b"Subject: x\r\n" + BODY
    rewrite = match_envelope(message, envelope)
    assert sorted(set(named(rewrite.message))) == sorted(envelope)
    assert rewrite.message.endswith(b"Subject: x\r\n" + BODY) or b"Bcc: " in rewrite.message
    assert rewrite.message.split(b"\r\n\r\n", 1)[1] == BODY[2:]
    assert rewrite.message.startswith(b"From: s@example.com\r\n")
