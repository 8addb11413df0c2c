"""Folding lines over 998 octets the way Postfix's SMTP client does, as a stream.

A printer or scanner that writes a whole HTML report or a PDF without line
breaks gets `554` from a strict server and never sends the message again.
RFC 5321 4.5.3.1.6 allows 998 octets before CRLF, so the gateway mends the
message instead, like Postfix with `smtp_line_length_limit = 998` (its
default since 2.9, smtp/smtp_proto.c `smtp_text_out`): after 998 octets of
one line, and only if more of that line follows, it inserts CRLF SPACE; the
continuation line holds the space and at most 997 more octets. Header and
body lines are treated alike. Removing every inserted CRLF SPACE gives the
message back byte for byte.

Why CRLF SPACE and not CRLF alone (Postfix's reason, "to minimize the damage
to MIME formatted mail"): a continuation line never starts a MIME boundary
("--..."), a "." line or a new header field, and is never empty, so the
header/body boundary (the first empty line) and the MIME structure stay
where they were. In the header a fold is where a reader unfolds (RFC 5322
2.2.3), which leaves one extra space in the field's value.

What folding means for each kind of content:

- base64 and quoted-printable parts never need it: RFC 2045 limits their
  lines to 76 characters. A broken encoder's over-long base64 line still
  decodes to the same bytes (decoders skip CRLF and space, RFC 2045 6.8); a
  quoted-printable one gets a line break and a space in its text.
- 7bit and 8BITMIME text (RFC 6152 keeps the 998-octet limit for 8-bit
  lines): the reader sees a line break and a space every 998 octets. Like
  Postfix, the fold counts octets, not characters, so it can fall inside a
  multi-byte UTF-8 character of such a line.
- Line ends: LF ends a line (with the CR before it, if any, not counted);
  a CR not followed by LF is an ordinary octet.

Memory is bounded whatever the line length: the only state between chunks
is the current line's length and at most one held-back CR (whether it ends
the line depends on the next chunk's first byte). Chunks with no line near
the limit are passed on unchanged after one scan in C (`bytes.split`).
"""

from __future__ import annotations

FOLD = b"\r\n "


class LineFolder:
    """A stream stage: message bytes in, bytes with no line over `limit` octets out."""

    def __init__(self, limit: int) -> None:
        if limit < 2:
            raise ValueError("a folded line needs room for the space and one octet")
        self._limit = limit
        # Octets of the current physical output line, before its line end.
        self._column = 0
        # A CR ended the last chunk: a line end if the next byte is LF.
        self._held_cr = False
        self.folds = 0

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if not self._held_cr and chunk[-1] != 0x0D and self._fits(chunk):
            return chunk
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        out: list[bytes] = []
        pos, size = 0, len(chunk)
        while pos < size:
            lf = chunk.find(b"\n", pos)
            if lf < 0:
                end = size
                if chunk[-1] == 0x0D:
                    end -= 1
                    self._held_cr = True
                self._content(chunk, pos, end, out)
                break
            end = lf - 1 if lf > pos and chunk[lf - 1] == 0x0D else lf
            self._content(chunk, pos, end, out)
            out.append(chunk[end : lf + 1])
            self._column = 0
            pos = lf + 1
        return b"".join(out)

    def close(self) -> bytes:
        """What is still held at the end of the message (a last bare CR)."""
        if not self._held_cr:
            return b""
        self._held_cr = False
        out: list[bytes] = []
        self._content(b"\r", 0, 1, out)
        return b"".join(out)

    def _fits(self, chunk: bytes) -> bool:
        """Whether no line of `chunk` can reach past the limit (counting a CR
        before LF as content, which only sends borderline chunks the slow way)."""
        limit = self._limit
        first = chunk.find(b"\n")
        if first < 0:
            if self._column + len(chunk) > limit:
                return False
            self._column += len(chunk)
            return True
        last = chunk.rfind(b"\n")
        tail = len(chunk) - last - 1
        if self._column + first > limit or tail > limit:
            return False
        if last - first - 1 > limit and max(map(len, chunk[first + 1 : last].split(b"\n"))) > limit:
            return False
        self._column = tail
        return True

    def _content(self, chunk: bytes, start: int, end: int, out: list[bytes]) -> None:
        """Append chunk[start:end] (no line end in it), folding where the line is full."""
        limit = self._limit
        while start < end:
            if self._column >= limit:
                out.append(FOLD)
                self._column = 1
                self.folds += 1
            take = min(end - start, limit - self._column)
            out.append(chunk[start : start + take])
            self._column += take
            start += take
