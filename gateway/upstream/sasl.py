"""SASL client mechanisms for upstream logins (POP3 AUTH, later IMAP and SMTP).

A mechanism only knows its own bytes: the initial response it sends with the
AUTH command and what it answers to a server challenge. Base64, line lengths
and the continuation syntax belong to each protocol's client, so one mechanism
object serves POP3 (RFC 5034), IMAP and SMTP alike.

The OAuth2 mechanisms are here because their one awkward case shapes the
interface: on a bad token, Microsoft, Google and Dovecot do not fail at once but
send a challenge carrying a base64 JSON error, and only answer with the final
error after the client replies (an empty response for XOAUTH2, ``0x01`` for
OAUTHBEARER). A client that treats that challenge as the failure desynchronises
the session.
"""

from __future__ import annotations

import json
from typing import Protocol

from gateway.model import Secret


class SASLMechanism(Protocol):
    """One client-side SASL exchange; a fresh object per login attempt."""

    @property
    def name(self) -> str:
        """The IANA mechanism name sent after AUTH, e.g. ``PLAIN``."""
        ...

    def initial_response(self) -> bytes | None:
        """Raw (not base64) bytes to send with AUTH, or None to wait for a challenge."""
        ...

    def respond(self, challenge: bytes) -> bytes | None:
        """Raw answer to a decoded server challenge; None cancels the exchange."""
        ...


class Plain:
    """RFC 4616 PLAIN: the whole exchange is the initial response."""

    name = "PLAIN"

    def __init__(self, username: str, password: Secret, authzid: str = "") -> None:
        for label, value in (("username", username), ("authzid", authzid)):
            if "\0" in value:
                raise ValueError(f"{label} contains a NUL character")
        if "\0" in password.reveal():
            raise ValueError("password contains a NUL character")
        self._username = username
        self._password = password
        self._authzid = authzid

    def initial_response(self) -> bytes:
        return b"\0".join(
            (
                self._authzid.encode(),
                self._username.encode(),
                self._password.reveal().encode(),
            )
        )

    def respond(self, challenge: bytes) -> bytes | None:
        # An empty challenge asks for the initial response (a server that did
        # not take it with the command, or a command too long to carry it).
        # Anything else is not part of PLAIN: cancel rather than guess.
        if challenge == b"":
            return self.initial_response()
        return None

    def __repr__(self) -> str:
        return f"Plain(username={self._username!r}, password={self._password!r})"


class Login:
    """The LOGIN mechanism (draft-murchison-sasl-login): user name, then password.

    Obsolete but still the only one some SMTP servers offer; used only when
    PLAIN is not offered. The server's prompts ("Username:", "Password:") are
    not relied upon, only their order.
    """

    name = "LOGIN"

    def __init__(self, username: str, password: Secret) -> None:
        self._username = username
        self._password = password
        self._step = 0

    def initial_response(self) -> None:
        return None

    def respond(self, challenge: bytes) -> bytes | None:
        self._step += 1
        if self._step == 1:
            return self._username.encode()
        if self._step == 2:
            return self._password.reveal().encode()
        return None

    def __repr__(self) -> str:
        return f"Login(username={self._username!r}, password={self._password!r})"


class XOAuth2:
    """Google/Microsoft XOAUTH2 with a bearer token."""

    name = "XOAUTH2"

    def __init__(self, username: str, token: Secret) -> None:
        if any(c in username for c in "\x01\r\n"):
            raise ValueError("username contains a control character")
        self._username = username
        self._token = token
        # The server's JSON error report, if it sent one (see `BearerError`).
        self.error: BearerError | None = None

    def initial_response(self) -> bytes:
        return f"user={self._username}\x01auth=Bearer {self._token.reveal()}\x01\x01".encode()

    def respond(self, challenge: bytes) -> bytes:
        # The only challenge is the JSON error report; an empty answer makes
        # the server send its final failure.
        self.error = BearerError.parse(challenge)
        return b""

    def __repr__(self) -> str:
        return f"XOAuth2(username={self._username!r}, token={self._token!r})"


class OAuthBearer:
    """RFC 7628 OAUTHBEARER with a bearer token."""

    name = "OAUTHBEARER"

    def __init__(self, username: str, token: Secret) -> None:
        if "," in username or "=" in username:
            # RFC 7628 gs2 header escaping, kept simple: such names do not
            # occur as mailbox logins and would need ",=2C"-style encoding.
            raise ValueError("username contains ',' or '='")
        self._username = username
        self._token = token
        self.error: BearerError | None = None

    def initial_response(self) -> bytes:
        return f"n,a={self._username},\x01auth=Bearer {self._token.reveal()}\x01\x01".encode()

    def respond(self, challenge: bytes) -> bytes:
        # RFC 7628 3.2.3: the client answers the error challenge with a
        # single %x01 to complete the (failed) exchange.
        self.error = BearerError.parse(challenge)
        return b"\x01"

    def __repr__(self) -> str:
        return f"OAuthBearer(username={self._username!r}, token={self._token!r})"


class BearerError:
    """The JSON error a server sends as a challenge when it refuses a bearer token.

    RFC 7628 3.2.2: ``{"status":"invalid_token","scope":...}``; Google and
    Dovecot send ``"status":"401"`` (or 400/403) instead. Only `status` and
    `scope` are kept, as short printable words, because that is all the log
    needs and the rest is free text from the server.
    """

    __slots__ = ("scope", "status")

    def __init__(self, status: str, scope: str = "") -> None:
        self.status = status
        self.scope = scope

    @classmethod
    def parse(cls, challenge: bytes) -> BearerError:
        try:
            document = json.loads(challenge.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return cls("unreadable")
        if not isinstance(document, dict):
            return cls("unreadable")
        return cls(_word(document.get("status")) or "missing", _word(document.get("scope")))

    @property
    def token_rejected(self) -> bool:
        """True when the server says the token itself is bad (expired, revoked):
        the one case where a fresh token may succeed."""
        return self.status in ("401", "invalid_token")

    def describe(self) -> str:
        return f"status={self.status}" + (f" scope={self.scope}" if self.scope else "")

    def __repr__(self) -> str:
        return f"BearerError({self.describe()})"


def _word(value: object, limit: int = 60) -> str:
    if not isinstance(value, (str, int)):
        return ""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)
