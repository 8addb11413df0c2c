"""Log lines as an admin's tools see them: twistd's text format, and the
shipped fail2ban filter applied to it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.logger import formatEventAsClassicLogText, globalLogPublisher

FILTER = Path(__file__).resolve().parents[2] / "etc" / "fail2ban" / "filter.d" / "gateway.conf"


@contextmanager
def captured_log() -> Iterator[list[str]]:
    """The text twistd would write for each event logged inside the block
    (one entry per event, as written: a forged line would show as two)."""
    text: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        formatted = formatEventAsClassicLogText(event)
        if formatted is not None:
            text.append(formatted)

    globalLogPublisher.addObserver(observe)
    try:
        yield text
    finally:
        globalLogPublisher.removeObserver(observe)


def fail2ban_hosts(lines: Iterable[str]) -> list[str]:
    """The addresses the shipped filter bans for, line by line as fail2ban reads
    a log. Its <HOST> is approximated by fail2ban's name-or-address pattern."""
    conf = FILTER.read_text()
    found = re.search(r"^failregex = (.*)$", conf, re.MULTILINE)
    assert found is not None
    host = r"(?:::f{4,6}:)?(?P<host>[\w\-.^_:]*\w)"
    pattern = re.compile(found.group(1).replace("<HOST>", host))
    return [m.group("host") for line in lines if (m := pattern.search(line))]
