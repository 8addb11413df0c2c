"""The server side of SMTP AUTH PLAIN and LOGIN (RFC 4954, 4616): no I/O.

Kept apart from the state machine so that every decoding rule is tested on
its own: the server only sends a `Challenge`'s prompt and feeds the next
line to its `answer`, replies with a `SASLError`, or checks `Credentials`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass

USERNAME_PROMPT = base64.b64encode(b"Username:")
PASSWORD_PROMPT = base64.b64encode(b"Password:")


@dataclass(frozen=True)
class Credentials:
    user: str
    password: bytes


@dataclass(frozen=True)
class SASLError:
    """The reply to a failed exchange. `counted`: whether it is a client error
    that counts towards closing the session (a cancel is not)."""

    code: int
    enhanced: str
    text: str
    counted: bool = True


@dataclass(frozen=True)
class Challenge:
    """Send `334 prompt`; the client's next line goes to `answer`."""

    prompt: bytes
    answer: Callable[[bytes], Outcome]


Outcome = Challenge | Credentials | SASLError

UNSUPPORTED = SASLError(504, "5.5.4", "unrecognized authentication type; use PLAIN or LOGIN")


def start(mechanism: str, initial: str) -> Outcome:
    """The first step of `AUTH mechanism [initial-response]`."""
    mechanism = mechanism.upper()
    if mechanism == "PLAIN":
        return _plain(initial.encode()) if initial else Challenge(b"", _plain)
    if mechanism == "LOGIN":
        return _login_user(initial.encode()) if initial else Challenge(USERNAME_PROMPT, _login_user)
    return UNSUPPORTED


def _decode(response: bytes) -> bytes | SASLError:
    if response == b"*":
        return SASLError(501, "5.0.0", "authentication cancelled", counted=False)
    try:
        return base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        return SASLError(501, "5.5.2", "cannot decode the response (base64)")


def _plain(response: bytes) -> Outcome:
    decoded = _decode(b"" if response == b"=" else response)
    if isinstance(decoded, SASLError):
        return decoded
    parts = decoded.split(b"\0")
    if len(parts) != 3:
        return SASLError(501, "5.5.2", "malformed PLAIN response")
    authzid, authcid, password = parts
    try:
        user = authcid.decode("utf-8")
    except UnicodeDecodeError:
        return SASLError(501, "5.5.2", "malformed PLAIN response")
    if authzid and authzid != authcid:
        return SASLError(535, "5.7.8", "authorization identity must match the user")
    return Credentials(user, password)


def _login_user(response: bytes) -> Outcome:
    decoded = _decode(response)
    if isinstance(decoded, SASLError):
        return decoded
    try:
        user = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return SASLError(501, "5.5.2", "malformed user name")
    return Challenge(PASSWORD_PROMPT, lambda answer: _login_password(user, answer))


def _login_password(user: str, response: bytes) -> Outcome:
    decoded = _decode(response)
    return decoded if isinstance(decoded, SASLError) else Credentials(user, decoded)
