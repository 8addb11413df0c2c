"""The real-Dovecot harness behaves the way the gateway's tests assume.

Python's poplib stands in for the gateway here, so a failure points at the
harness (or at Dovecot), never at gateway code.
"""

from __future__ import annotations

import base64
import json
import poplib
import smtplib
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot

pytestmark = pytest.mark.integration


def client_context(material: TLSMaterial) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(material.ca_file))


def pop3s_login(server: Dovecot, material: TLSMaterial, user: str = "alice") -> poplib.POP3_SSL:
    client = poplib.POP3_SSL(server.host, server.pop3s_port, context=client_context(material))
    client.user(user)
    client.pass_(server.users[user])
    return client


def crlf(stored: bytes) -> bytes:
    return stored.replace(b"\n", b"\r\n")


def subject_of(message: bytes) -> bytes:
    return message.splitlines()[0]


def listed_subjects(client: poplib.POP3) -> list[bytes]:
    _, listing, _ = client.list()
    return [client.top(number, 0)[1][0] for number in range(1, len(listing) + 1)]


def test_list_sizes_and_retr_are_the_crlf_form_of_the_stored_messages(
    clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    server = clean_mailboxes
    server.deliver("alice", b"Subject: one\r\n\r\nshort\r\n")
    server.deliver("alice", b"Subject: two\n\n.leading dot\nbare LF lines\n")
    server.deliver("alice", b"Subject: three\r\n\r\n" + (b"x" * 76 + b"\r\n") * 200)
    server.deliver("bob", b"Subject: not alice's\r\n\r\n")
    stored = server.messages("alice")
    assert all(b"\r" not in message for message in stored)

    client = pop3s_login(server, tls_upstream)
    _, listing, _ = client.list()
    assert [line.split()[1] for line in listing] == [b"%d" % len(crlf(m)) for m in stored]
    for number, message in enumerate(stored, start=1):
        _, lines, _ = client.retr(number)
        # poplib strips the CRLFs and undoes the dot-stuffing
        assert b"\r\n".join(lines) + b"\r\n" == crlf(message)
    assert [subject_of(m) for m in stored] == [b"Subject: one", b"Subject: two", b"Subject: three"]
    client.quit()


def test_messages_follow_dovecots_pop3_numbering(
    clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    """Dovecot numbers unseen maildir files by the time in their names (seconds
    compared as numbers, then microseconds), and appends later arrivals after
    the messages it has already numbered, whatever their time stamps."""
    server = clean_mailboxes
    stamps = {b"c": 1_000_000_000.000010, b"a": 999_999_999.5, b"b": 1_000_000_000.000009}
    for name, when in stamps.items():
        server.deliver("alice", b"Subject: " + name + b"\n\n", when=when)
    server.deliver("alice", b"Subject: d\n\n")  # now
    expected = [b"Subject: a", b"Subject: b", b"Subject: c", b"Subject: d"]
    assert [subject_of(m) for m in server.messages("alice")] == expected

    client = pop3s_login(server, tls_upstream)
    assert listed_subjects(client) == expected
    client.quit()

    server.deliver("alice", b"Subject: e, old stamp but late\n\n", when=5.0)
    expected.append(b"Subject: e, old stamp but late")
    assert [subject_of(m) for m in server.messages("alice")] == expected
    client = pop3s_login(server, tls_upstream)
    assert listed_subjects(client) == expected
    client.quit()


def test_dele_and_quit_remove_the_file(clean_mailboxes: Dovecot, tls_upstream: TLSMaterial) -> None:
    server = clean_mailboxes
    for name in (b"keep", b"drop"):
        server.deliver("alice", b"Subject: " + name + b"\n\n")
    client = pop3s_login(server, tls_upstream)
    client.dele(2)
    client.quit()
    assert [subject_of(m) for m in server.messages("alice")] == [b"Subject: keep"]


def test_stls_upgrades_the_plain_port(dovecot: Dovecot, tls_upstream: TLSMaterial) -> None:
    client = poplib.POP3(dovecot.host, dovecot.pop3_port)
    assert "STLS" in client.capa()
    client.stls(client_context(tls_upstream))
    client.user("bob")
    assert client.pass_("bob-pw").startswith(b"+OK")
    client.quit()


def test_certificate_from_another_ca_is_refused(dovecot: Dovecot, tls_gateway: TLSMaterial) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=client_context(tls_gateway))


def test_wrong_password_fails_without_delay(dovecot: Dovecot, tls_upstream: TLSMaterial) -> None:
    client = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=client_context(tls_upstream))
    client.user("alice")
    started = time.monotonic()
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("wrong")
    assert time.monotonic() - started < 0.5
    client.close()
    # ...and the failure does not penalise the next login from 127.0.0.1
    started = time.monotonic()
    pop3s_login(dovecot, tls_upstream).quit()
    assert time.monotonic() - started < 0.5


def test_kick_drops_a_live_session(dovecot: Dovecot, tls_upstream: TLSMaterial) -> None:
    client = pop3s_login(dovecot, tls_upstream, user="bob")
    assert dovecot.kick("bob", retry_for=5)
    with pytest.raises((poplib.error_proto, OSError)):
        client.noop()
        client.noop()
    client.close()


def test_second_login_gets_in_use_with_pop3_lock_session(
    tmp_path: Path, tls_upstream: TLSMaterial
) -> None:
    """Takes ~10 s: Dovecot 2.3 waits that long for the lock before answering."""
    with Dovecot(
        tmp_path / "dovecot", {"alice": "alice-pw"}, tls=tls_upstream, pop3_lock_session=True
    ) as server:
        first = pop3s_login(server, tls_upstream)
        second = poplib.POP3_SSL(
            server.host, server.pop3s_port, context=client_context(tls_upstream)
        )
        second.user("alice")
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            second.pass_("alice-pw")
        second.close()
        first.quit()


def test_listening_off_the_clients_address_refuses_plaintext_before_stls(
    tmp_path: Path,
) -> None:
    """Dovecot trusts a client whose address equals its own (127.0.0.1 to
    127.0.0.1); on 127.0.0.2 it behaves like a provider and wants STLS first."""
    material = make_tls_material(tmp_path / "tls", names=("127.0.0.2",))
    with Dovecot(
        tmp_path / "dovecot", {"alice": "alice-pw"}, tls=material, host="127.0.0.2"
    ) as server:
        client = poplib.POP3(server.host, server.pop3_port)
        assert "USER" not in client.capa()
        with pytest.raises(poplib.error_proto, match="Plaintext authentication disallowed"):
            client.user("alice")
        client.stls(client_context(material))
        client.user("alice")
        assert client.pass_("alice-pw").startswith(b"+OK")
        client.quit()


class _Introspection(BaseHTTPRequestHandler):
    """RFC 7662 token introspection: only the token "good-token" is active."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        active = b"token=good-token" in body
        answer = {"active": True, "username": "alice"} if active else {"active": False}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def introspection_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Introspection)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/introspect"
    server.shutdown()
    server.server_close()


def test_oauth2_bearer_tokens_smoke(
    tmp_path: Path, tls_upstream: TLSMaterial, introspection_url: str
) -> None:
    with Dovecot(
        tmp_path / "dovecot",
        {"alice": "alice-pw"},
        tls=tls_upstream,
        oauth2_introspection_url=introspection_url,
    ) as server:
        for token, expected in (("good-token", b"+OK"), ("revoked", b"+ ")):
            client = poplib.POP3_SSL(
                server.host, server.pop3s_port, context=client_context(tls_upstream)
            )
            assert {"XOAUTH2", "OAUTHBEARER", "PLAIN"} <= set(client.capa()["SASL"])
            blob = base64.b64encode(f"user=alice\x01auth=Bearer {token}\x01\x01".encode())
            assert client._shortcmd("AUTH XOAUTH2 " + blob.decode()).startswith(expected)
            client.close()
        pop3s_login(server, tls_upstream).quit()  # passwords still work


def test_stop_is_idempotent_and_start_works_again(
    tmp_path: Path, tls_upstream: TLSMaterial
) -> None:
    server = Dovecot(tmp_path / "dovecot", {"alice": "alice-pw"}, tls=tls_upstream)
    server.start()
    server.deliver("alice", b"Subject: survives a restart\n\n")
    server.stop()
    server.stop()
    assert not server.running
    with server:
        client = pop3s_login(server, tls_upstream)
        assert listed_subjects(client) == [b"Subject: survives a restart"]
        client.quit()
    assert "starting up" in server.log_text()


def test_submission_service_when_a_relay_port_is_given(
    tmp_path: Path, tls_upstream: TLSMaterial
) -> None:
    """Only the login is checked: right after it Dovecot connects to the relay,
    and with nothing listening there it answers 421 and hangs up."""
    with Dovecot(
        tmp_path / "dovecot", {"alice": "alice-pw"}, tls=tls_upstream, submission_relay_port=9
    ) as server:
        assert server.submission_port is not None
        client = smtplib.SMTP(server.host, server.submission_port, timeout=5)
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=client_context(tls_upstream))
        client.ehlo()
        assert {"PLAIN", "LOGIN"} <= set(client.esmtp_features["auth"].upper().split())
        assert client.login("alice", "alice-pw")[0] == 235
        client.close()


def test_no_submission_service_without_a_relay_port(dovecot: Dovecot) -> None:
    assert dovecot.submission_port is None
