"""The server side of SMTP AUTH PLAIN and LOGIN, without a transport."""

from __future__ import annotations

import base64

from gateway.smtp import sasl
from gateway.smtp.sasl import Challenge, Credentials, SASLError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_plain_with_an_initial_response() -> None:
    assert sasl.start("plain", b64(b"\0dev\0pw")) == Credentials("dev", b"pw")
    assert sasl.start("PLAIN", b64(b"dev\0dev\0pw")) == Credentials("dev", b"pw")


def test_plain_after_an_empty_challenge() -> None:
    step = sasl.start("PLAIN", "")
    assert isinstance(step, Challenge) and step.prompt == b""
    assert step.answer(b64(b"\0dev\0p w").encode()) == Credentials("dev", b"p w")


def test_login_asks_user_then_password() -> None:
    step = sasl.start("LOGIN", "")
    assert isinstance(step, Challenge) and step.prompt == sasl.USERNAME_PROMPT
    step = step.answer(b64(b"dev").encode())
    assert isinstance(step, Challenge) and step.prompt == sasl.PASSWORD_PROMPT
    assert step.answer(b64(b"pw").encode()) == Credentials("dev", b"pw")
    # The user name may come as the initial response.
    step = sasl.start("LOGIN", b64(b"dev"))
    assert isinstance(step, Challenge) and step.prompt == sasl.PASSWORD_PROMPT


def test_refusals() -> None:
    assert sasl.start("CRAM-MD5", "") == sasl.UNSUPPORTED
    cancel = sasl.start("PLAIN", "*")
    assert isinstance(cancel, SASLError) and cancel.code == 501 and not cancel.counted
    bad = sasl.start("PLAIN", "not base64!")
    assert isinstance(bad, SASLError) and bad.enhanced == "5.5.2" and bad.counted
    assert sasl.start("PLAIN", b64(b"only\0two")) == SASLError(
        501, "5.5.2", "malformed PLAIN response"
    )
    assert sasl.start("PLAIN", b64(b"\0\xff\0pw")) == SASLError(
        501, "5.5.2", "malformed PLAIN response"
    )
    other = sasl.start("PLAIN", b64(b"boss\0dev\0pw"))
    assert isinstance(other, SASLError) and other.code == 535
    assert sasl.start("LOGIN", b64(b"\xff")) == SASLError(501, "5.5.2", "malformed user name")
