"""The IMAP-backed maildrop against a real Dovecot on loopback, in process.

Dovecot's own POP3 service on the same mailbox is the oracle: whatever a
device would have received from a POP3 mailbox, byte for byte, it must receive
through an IMAP folder too.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.testing import StringTransport

from gateway.maildrop import (
    NoSuchMessage,
    UpstreamLost,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.maildrop.imap import HIDDEN_KEYWORD, IMAPMaildrop, open_imap_maildrop
from gateway.maildrop.uidl_map import UIDStore
from gateway.model import Endpoint, Provider, Secret
from gateway.upstream.imap import Capabilities
from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_process import free_port
from tests.helpers.imap import (
    Oracle,
    crlf,
    imap_account,
    imap_provider,
    reactor,
    retrieve,
    varied_messages,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(tmp_path: Path) -> UIDStore:
    s = UIDStore.in_state_dir(tmp_path / "state")
    yield s
    s.close()


async def open_drop(
    dovecot: Dovecot, ca: TLSMaterial, store: UIDStore | None = None, tls: str = "implicit", **kw
) -> IMAPMaildrop:
    return await open_imap_maildrop(
        imap_account(**kw), imap_provider(dovecot, ca, tls), reactor=reactor(), uid_store=store
    )


def flags(dovecot: Dovecot, user: str = "alice", folder: str = "INBOX") -> list[str]:
    """Each message's flags in UID order, from doveadm (not through IMAP)."""
    out = dovecot.doveadm("fetch", "-u", user, "flags", "mailbox", folder)
    found = [
        line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("flags:")
    ]
    # \Recent belongs to whichever session saw the message first, not to the message.
    return [" ".join(f for f in fl if f != "\\Recent") for fl in found]


def folder_messages(dovecot: Dovecot, folder: str, user: str = "alice") -> list[bytes]:
    out = dovecot.doveadm("fetch", "-u", user, "hdr", "mailbox", folder)
    return [line.encode() for line in out.splitlines() if line.startswith("Message-ID")]


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
@pytest_twisted.ensureDeferred
async def test_retr_and_top_byte_for_byte_like_dovecot_pop3(
    tls: str, clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    dovecot = clean_mailboxes
    for m in varied_messages():
        dovecot.deliver("alice", m)
    tops = (0, 1, 3, 10_000)
    before = flags(dovecot)
    drop = await open_drop(dovecot, tls_upstream, tls=tls)
    got_top: dict[tuple[int, int], bytes] = {}
    try:
        got = [await retrieve(drop, n) for n in range(1, len(drop.sizes) + 1)]
        for n in range(1, len(drop.sizes) + 1):
            for lines in tops:
                got_top[(n, lines)] = await retrieve(drop, n, lines)
        sizes = list(drop.sizes)
        await drop.commit([])
    finally:
        drop.abort()
    assert flags(dovecot) == before == [""] * len(before), "flags changed (\\Seen?)"
    # Dovecot's POP3 RETR sets \Seen itself, so the oracle reads last.
    whole, top = await Oracle(dovecot, tls_upstream).read(tops)
    assert len(got) == len(whole) == len(varied_messages())
    for n, expected in enumerate(whole, 1):
        assert got[n - 1] == expected, n
        for lines in tops:
            assert got_top[(n, lines)] == top[(n, lines)], (n, lines)
    # LIST sizes are the unstuffed CRLF sizes, as Dovecot's POP3 LIST gives them.
    assert sizes == [len(crlf(m)) for m in dovecot.messages("alice")]


@pytest_twisted.ensureDeferred
async def test_dele_expunge_at_quit_removes_exactly_those(
    clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    dovecot = clean_mailboxes
    for n in range(4):
        dovecot.deliver("alice", b"Message-ID: <%d@x>\n\nbody %d\n" % (n, n))
    drop = await open_drop(dovecot, tls_upstream)
    await drop.commit([1, 3])
    assert [m.split(b"\n")[0] for m in dovecot.messages("alice")] == [
        b"Message-ID: <1@x>",
        b"Message-ID: <3@x>",
    ]


@pytest.mark.parametrize("policy", ["expunge", "move", "keep"])
@pytest_twisted.ensureDeferred
async def test_abort_changes_nothing(
    policy: str, clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    dovecot = clean_mailboxes
    for n in range(2):
        dovecot.deliver("alice", b"Message-ID: <%d@x>\n\nbody\n" % n)
    kw = {"move_to": "Archive"} if policy == "move" else {}
    drop = await open_drop(dovecot, tls_upstream, on_delete=policy, mark_seen=True, **kw)
    await retrieve(drop, 1)
    drop.abort()
    await drop.client.when_closed()
    assert len(dovecot.messages("alice")) == 2
    assert flags(dovecot) == ["", ""]


@pytest_twisted.ensureDeferred
async def test_unknown_folder_is_an_admin_problem(
    dovecot: Dovecot, tls_upstream: TLSMaterial
) -> None:
    with pytest.raises(UpstreamRejected) as caught:
        await open_drop(dovecot, tls_upstream, folder="No Such Folder")
    assert "No Such Folder" in caught.value.detail


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_rejected(dovecot: Dovecot, tls_upstream: TLSMaterial) -> None:
    with pytest.raises(UpstreamRejected) as caught:
        await open_drop(dovecot, tls_upstream, password=Secret("not-alices-password"))
    assert "AUTHENTICATIONFAILED" in caught.value.detail
    assert "not-alices-password" not in caught.value.detail


@pytest_twisted.ensureDeferred
async def test_message_gone_meanwhile(clean_mailboxes: Dovecot, tls_upstream: TLSMaterial) -> None:
    dovecot = clean_mailboxes
    dovecot.deliver("alice", b"Message-ID: <1@x>\n\nbody\n")
    drop = await open_drop(dovecot, tls_upstream)
    try:
        for path in dovecot.message_files("alice"):
            path.unlink()
        with pytest.raises(NoSuchMessage):
            await retrieve(drop, 1)
    finally:
        drop.abort()


def ids(dovecot: Dovecot, folder: str = "INBOX", user: str = "alice") -> list[str]:
    """Message-IDs of a folder in UID order, read with doveadm."""
    out = dovecot.doveadm("fetch", "-u", user, "hdr.message-id", "mailbox", folder)
    return [line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line]


def fill(dovecot: Dovecot, count: int, user: str = "alice") -> None:
    for n in range(1, count + 1):
        dovecot.deliver(user, b"Message-ID: <%d@x>\nSubject: %d\n\nbody %d\n" % (n, n, n))


@pytest.mark.parametrize("without", [(), ("UIDPLUS", "MOVE")])
@pytest.mark.parametrize("policy", ["expunge", "move", "keep"])
@pytest_twisted.ensureDeferred
async def test_dele_policies_at_quit(
    policy: str, without: tuple[str, ...], clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    """Each policy acts on exactly the deleted messages, with or without the
    extensions that make it atomic (the fallbacks run against the real server,
    which is only told the extensions are missing)."""
    dovecot = clean_mailboxes
    dovecot.doveadm("mailbox", "delete", "-u", "alice", "-s", "Archive", ok_codes=(0, 68))
    fill(dovecot, 4)
    kw = {"move_to": "Archive"} if policy == "move" else {}
    drop = await open_drop(dovecot, tls_upstream, on_delete=policy, **kw)
    hide_extensions(drop, without)
    await drop.commit([2, 4])
    if policy == "keep":
        assert ids(dovecot) == ["<1@x>", "<2@x>", "<3@x>", "<4@x>"]
        assert flags(dovecot) == ["", HIDDEN_KEYWORD, "", HIDDEN_KEYWORD]
    else:
        assert ids(dovecot) == ["<1@x>", "<3@x>"]
    if policy == "move":
        assert ids(dovecot, "Archive") == ["<2@x>", "<4@x>"]
        assert flags(dovecot, folder="Archive") == ["", ""]
    # The next session sees only what is left, whatever the policy.
    drop = await open_drop(dovecot, tls_upstream, on_delete=policy, **kw)
    try:
        assert [(await retrieve(drop, n)).split(b"\r\n")[0] for n in (1, 2)] == [
            b"Message-ID: <1@x>",
            b"Message-ID: <3@x>",
        ]
        assert len(drop.sizes) == 2
    finally:
        drop.abort()


def hide_extensions(drop: IMAPMaildrop, names: tuple[str, ...]) -> None:
    client = drop.client
    client.capabilities = Capabilities(client.capabilities.names - set(names))


@pytest_twisted.ensureDeferred
async def test_expunge_without_uidplus_spares_messages_others_marked_deleted(
    clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 3)
    drop = await open_drop(dovecot, tls_upstream)
    hide_extensions(drop, ("UIDPLUS",))
    # Another IMAP client marked message 3 \Deleted but has not expunged yet.
    dovecot.doveadm("flags", "add", "-u", "alice", "\\Deleted", "mailbox", "INBOX", "uid", "3")
    await drop.commit([1])
    assert ids(dovecot) == ["<1@x>", "<2@x>", "<3@x>"]
    assert flags(dovecot) == [f"\\Deleted {HIDDEN_KEYWORD}", "", "\\Deleted"]
    # Hidden from the device meanwhile; the next expunge by anyone removes it.
    drop = await open_drop(dovecot, tls_upstream)
    assert len(drop.sizes) == 2
    hide_extensions(drop, ("UIDPLUS",))
    dovecot.doveadm("flags", "remove", "-u", "alice", "\\Deleted", "mailbox", "INBOX", "uid", "3")
    await drop.commit([1])
    assert ids(dovecot) == ["<3@x>"]


@pytest_twisted.ensureDeferred
async def test_mark_seen_sets_seen_at_quit_on_retrieved_messages_only(
    clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 3)
    drop = await open_drop(dovecot, tls_upstream, mark_seen=True)
    await retrieve(drop, 1)
    await retrieve(drop, 2, 0)  # TOP is not a retrieval
    assert flags(dovecot) == ["", "", ""]
    await drop.commit([])
    assert flags(dovecot) == ["\\Seen", "", ""]


@pytest_twisted.ensureDeferred
async def test_message_arriving_during_a_session_waits_for_the_next(
    clean_mailboxes: Dovecot, tls_upstream: TLSMaterial, store: UIDStore
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 2)
    drop = await open_drop(dovecot, tls_upstream, store)
    dovecot.deliver("alice", b"Message-ID: <late@x>\n\nlate\n")
    assert len(drop.sizes) == 2
    assert len(await drop.unique_ids()) == 2
    await drop.commit([1, 2])
    assert ids(dovecot) == ["<late@x>"]
    drop = await open_drop(dovecot, tls_upstream, store)
    try:
        assert len(drop.sizes) == 1
        assert (await retrieve(drop, 1)).startswith(b"Message-ID: <late@x>")
    finally:
        drop.abort()


@pytest_twisted.ensureDeferred
async def test_uidls_stable_across_sessions_and_a_uidvalidity_change(
    clean_mailboxes: Dovecot, tls_upstream: TLSMaterial, store: UIDStore
) -> None:
    dovecot = clean_mailboxes
    fill(dovecot, 3)
    first = await uidls(dovecot, tls_upstream, store)
    assert len(set(first)) == 3
    assert await uidls(dovecot, tls_upstream, store) == first
    validity = dovecot.doveadm("mailbox", "status", "-u", "alice", "uidvalidity", "INBOX")
    # The folder is rebuilt: message 1 went away, a new one came, and Dovecot
    # lost its UID list and indexes, so it hands out a new UIDVALIDITY and
    # renumbers: old UIDs 2 and 3 become 1 and 2.
    dovecot.message_files("alice")[0].unlink()
    dovecot.deliver("alice", b"Message-ID: <new@x>\n\nnew\n")
    maildir = dovecot.maildir("alice")
    for name in glob.glob(str(maildir / "dovecot-uidlist")) + glob.glob(
        str(maildir / "dovecot.index*")
    ):
        os.unlink(name)
    assert dovecot.doveadm("mailbox", "status", "-u", "alice", "uidvalidity", "INBOX") != validity
    drop = await open_drop(dovecot, tls_upstream, store)
    try:
        assert drop.snapshot.uids == (1, 2, 3)
        after = list(await drop.unique_ids())
    finally:
        drop.abort()
    assert after[:2] == first[1:]
    assert after[2] not in first
    # ...and stays so.
    assert await uidls(dovecot, tls_upstream, store) == after


async def uidls(dovecot: Dovecot, ca: TLSMaterial, store: UIDStore) -> list[str]:
    drop = await open_drop(dovecot, ca, store)
    try:
        return list(await drop.unique_ids())
    finally:
        await drop.commit([])


@pytest_twisted.ensureDeferred
async def test_upstream_dropped_mid_message(
    clean_mailboxes: Dovecot, tls_upstream: TLSMaterial
) -> None:
    dovecot = clean_mailboxes
    dovecot.deliver("alice", b"Message-ID: <big@x>\n\n" + b"0123456789abcde\n" * 1_000_000)
    drop = await open_drop(dovecot, tls_upstream)
    sink = KickingSink(dovecot)
    with pytest.raises(UpstreamLost):
        await drop.retrieve(1, sink)
    assert 0 < len(sink.value()) < drop.sizes[0]
    assert sink.producer is None
    assert len(dovecot.messages("alice")) == 1


class KickingSink(StringTransport):
    """A device whose first write coincides with the provider kicking the session."""

    def __init__(self, dovecot: Dovecot) -> None:
        super().__init__()
        self._dovecot: Dovecot | None = dovecot

    def write(self, data: bytes) -> None:
        super().write(data)
        if self._dovecot is not None:
            dovecot, self._dovecot = self._dovecot, None
            assert dovecot.kick("alice", retry_for=5)


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
@pytest_twisted.ensureDeferred
async def test_upstream_certificate_from_another_ca_is_unavailable(
    tls: str, dovecot: Dovecot, tls_upstream: TLSMaterial, tmp_path: Path
) -> None:
    stranger = make_tls_material(tmp_path / "stranger")
    provider = imap_provider(dovecot, stranger, tls)
    with pytest.raises(UpstreamUnavailable) as caught:
        await open_imap_maildrop(imap_account(), provider, reactor=reactor(), uid_store=None)
    assert "TLS" in caught.value.detail, caught.value.detail
    assert "alice-pw" not in caught.value.detail


@pytest_twisted.ensureDeferred
async def test_nothing_listening_is_unavailable(tls_upstream: TLSMaterial) -> None:
    provider = Provider(
        "down", imap=Endpoint("127.0.0.1", free_port(), "implicit"), ca_file=tls_upstream.ca_file
    )
    with pytest.raises(UpstreamUnavailable):
        await open_imap_maildrop(imap_account(), provider, reactor=reactor(), uid_store=None)
