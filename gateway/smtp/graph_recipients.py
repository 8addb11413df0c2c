"""Makes a message's recipient headers say what its SMTP envelope says.

Graph's MIME send has no envelope: `sendMail` takes the message alone
(api/user-sendmail, graph/outlook-send-mime-message) and Exchange delivers to
the recipients its To, Cc and Bcc header fields name; nothing in Microsoft's
documentation offers a way to pass other recipients. SMTP, where the devices
come from, delivers to the envelope only (RFC 5321 section 3.3; a device puts
Bcc recipients in the envelope and leaves them out of the headers). So
before a Graph send the relay rewrites those three fields, and nothing else:

- a To or Cc field whose addresses are all still to be delivered (the
  message's pending envelope recipients) is kept byte for byte; one that
  names others is written again with only the pending ones (their display
  names kept), or removed when none is left;
- every Bcc field is removed;
- the pending recipients no To/Cc field names are added in one new
  `Bcc:` field at the end of the header (Exchange does not show Bcc to the
  recipients).

A message whose headers already match its envelope is sent unchanged, byte
for byte. Group syntax without addresses ("undisclosed-recipients:;") names
no one and is kept. Resent-* fields are not touched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses

_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
RECIPIENT_FIELDS = (b"to", b"cc")


@dataclass
class Rewrite:
    """What changed (empty lists: the message went out as it came)."""

    message: bytes
    dropped: list[str] = field(default_factory=list)
    added_bcc: list[str] = field(default_factory=list)
    removed_bcc: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.added_bcc or self.removed_bcc)


def _split_header(message: bytes) -> tuple[list[bytes], bytes, bytes]:
    """Header lines (with their line ends), the line end in use, and the rest."""
    lines: list[bytes] = []
    offset = 0
    eol = b"\r\n"
    while offset < len(message):
        end = message.find(b"\n", offset)
        end = len(message) if end < 0 else end + 1
        line = message[offset:end]
        if line in (b"\r\n", b"\n"):
            break
        if not lines and line.endswith(b"\n") and not line.endswith(b"\r\n"):
            eol = b"\n"
        lines.append(line)
        offset = end
    return lines, eol, message[offset:]


def _fields(lines: list[bytes]) -> list[tuple[bytes | None, bytes]]:
    """(lower-case name or None, raw text with folded lines) per field."""
    found: list[tuple[bytes | None, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and found:
            name, raw = found[-1]
            found[-1] = (name, raw + line)
            continue
        match = _FIELD.match(line)
        found.append((match.group(1).lower() if match else None, line))
    return found


def _addresses(raw: bytes) -> list[tuple[str, str]]:
    value = raw.split(b":", 1)[1].decode("latin-1")
    return [(name, addr) for name, addr in getaddresses([value]) if addr]


def _mailbox(name: str, addr: str) -> str:
    if not name:
        return addr
    if _SPECIALS.search(name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{addr}>"


def _field(name: bytes, mailboxes: Sequence[str], eol: bytes) -> bytes:
    text = ("," + eol.decode() + " ").join(mailboxes)
    return name + b": " + text.encode("latin-1") + eol


def match_envelope(message: bytes, recipients: Sequence[str]) -> Rewrite:
    """`message` with To/Cc/Bcc naming exactly `recipients` (module doc)."""
    wanted = {r.lower(): r for r in recipients}
    lines, eol, rest = _split_header(message)
    fields = _fields(lines)
    named: set[str] = set()
    plan: list[bytes | None] = []  # None: keep the raw field
    dropped: list[str] = []
    removed_bcc = False
    for name, raw in fields:
        if name == b"bcc":
            removed_bcc = True
            plan.append(b"")
            continue
        if name not in RECIPIENT_FIELDS:
            plan.append(None)
            continue
        pairs = _addresses(raw)
        kept = [(n, a) for n, a in pairs if a.lower() in wanted]
        named.update(a.lower() for _, a in kept)
        if len(kept) == len(pairs):
            plan.append(None)
            continue
        dropped += [a for _, a in pairs if a.lower() not in wanted]
        original = raw.split(b":", 1)[0]
        plan.append(_field(original, [_mailbox(n, a) for n, a in kept], eol) if kept else b"")
    added = [r for key, r in wanted.items() if key not in named]
    if not dropped and not added and not removed_bcc:
        return Rewrite(message)
    out = [raw if new is None else new for (_, raw), new in zip(fields, plan, strict=True)]
    if added:
        if out and not out[-1].endswith(b"\n"):
            out[-1] += eol  # a header that ends the message without a line end
        out.append(_field(b"Bcc", [f"<{a}>" for a in added], eol))
    return Rewrite(b"".join(out) + rest, dropped, added, removed_bcc)
