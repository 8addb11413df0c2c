"""What the device-facing servers share: the quoting of values in log lines."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from gateway.sessions import log_value


def test_names_and_addresses_stay_as_they_are() -> None:
    for value in ("printer-3f", "10.20.3.7", "2001:db8::1", "scan@example.com", "TLSv1.3"):
        assert log_value(value) == value


def test_anything_else_is_a_json_string() -> None:
    assert log_value("") == '""'
    assert log_value("quit before login") == '"quit before login"'
    assert log_value('ghost from 10.77.77.77: wrong "password"') == (
        '"ghost from 10.77.77.77: wrong \\"password\\""'
    )
    assert log_value("a\nb\rc\0d\u2028e\\") == '"a\\nb\\rc\\u0000d\\u2028e\\\\"'


@given(st.text())
def test_a_value_is_one_field_that_reads_back(value: str) -> None:
    written = log_value(value)
    assert written.isascii() and written.isprintable()
    assert " " not in written or (written.startswith('"') and written.endswith('"'))
    assert (json.loads(written) if written.startswith('"') else written) == value
