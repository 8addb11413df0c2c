"""`[log] format = "json"`: one JSON object per line with the event's fields."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from twisted.application.service import Application, IServiceCollection, MultiService
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.logfile import LogFile

from gateway.logs import (
    LoggedService,
    event_as_json_line,
    json_log_observer,
    twistd_log_file,
    with_json_log,
)
from gateway.model import Secret


def logged_lines(emit: object) -> list[dict[str, object]]:
    out = io.StringIO()
    log = Logger(namespace="gateway.pop3", observer=json_log_observer(out))
    emit(log)  # type: ignore[operator]
    lines = out.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_a_session_line_has_the_session_fields_as_keys() -> None:
    [line] = logged_lines(
        lambda log: log.info(
            "pop3 session device={device} peer={peer} account={account} tls={tls_version} "
            "cipher={tls_cipher} bytes={bytes_out} duration={duration:.3f}s outcome={outcome}",
            device="printer",
            peer="10.1.2.3",
            account="scanner",
            tls_version="TLSv1.3",
            tls_cipher="TLS_AES_256_GCM_SHA384",
            bytes_out=1234,
            duration=0.25,
            outcome="quit",
        )
    )
    assert line["level"] == "info"
    assert line["namespace"] == "gateway.pop3"
    assert str(line["time"]).endswith("+00:00")
    assert line["message"] == (
        "pop3 session device=printer peer=10.1.2.3 account=scanner tls=TLSv1.3 "
        "cipher=TLS_AES_256_GCM_SHA384 bytes=1234 duration=0.250s outcome=quit"
    )
    for key, expected in {
        "device": "printer",
        "peer": "10.1.2.3",
        "account": "scanner",
        "tls_version": "TLSv1.3",
        "tls_cipher": "TLS_AES_256_GCM_SHA384",
        "bytes_out": 1234,
        "duration": 0.25,
        "outcome": "quit",
    }.items():
        assert line[key] == expected
    assert not any(key.startswith("log_") for key in line)


def test_a_peer_supplied_value_cannot_forge_a_line_or_field() -> None:
    forged = "ghost\nfrom 10.77.77.77: wrong password\r\x00"
    [line] = logged_lines(
        lambda log: log.warn(
            "pop3 login refused for device {device} from {peer}: {reason}",
            device=forged,
            peer="127.0.0.1",
            reason="unknown device",
        )
    )
    assert line["device"] == forged
    assert line["peer"] == "127.0.0.1"


def test_secrets_show_masked_and_odd_values_become_text() -> None:
    line = json.loads(
        event_as_json_line(
            {
                "log_format": "x {password}",
                "log_level": LogLevel.error,
                "log_time": 0.0,
                "password": Secret("hunter2"),
                "path": Path("/var/lib/gateway"),
                "raw": b"\xff\x00",
                "ratio": float("nan"),
                "ids": ("a", "b"),
                "message": "a field named like a meta key",
            }
        )
    )
    assert "hunter2" not in json.dumps(line)
    assert line["password"] == "Secret('********')"
    assert line["path"] == "/var/lib/gateway"
    assert line["raw"] == "\\xff\x00"
    assert line["ratio"] == "nan"
    assert line["ids"] == ["a", "b"]
    assert line["field_message"] == "a field named like a meta key"
    assert line["time"] == "1970-01-01T00:00:00.000+00:00"


def test_a_failure_carries_its_traceback() -> None:
    def emit(log: Logger) -> None:
        try:
            raise ZeroDivisionError("integer division or modulo by zero")
        except ZeroDivisionError:
            log.failure("pop3 internal error for device {device}", device="printer")

    [line] = logged_lines(emit)
    assert line["level"] == "critical"
    assert "ZeroDivisionError" in str(line["traceback"])


def test_twistd_destinations(tmp_path: Path) -> None:
    assert twistd_log_file({"nodaemon": True, "logfile": None}) is sys.stdout
    assert twistd_log_file({"logfile": "-"}) is sys.stdout
    assert twistd_log_file({"syslog": True}) is None
    written = twistd_log_file({"logfile": str(tmp_path / "gateway.log")})
    assert isinstance(written, LogFile)
    written.close()


def test_the_observer_becomes_the_applications_for_twistd(tmp_path: Path) -> None:
    gateway = MultiService()
    gateway.setName("gateway")
    service = with_json_log(gateway, {"logfile": str(tmp_path / "gateway.log")})
    assert isinstance(service, LoggedService)
    application = Application("gateway")
    service.setServiceParent(application)
    observer = application.getComponent(ILogObserver)
    assert observer is service.observer
    assert IServiceCollection(application).getServiceNamed  # the tree is in place
    assert list(service) == [gateway]
    observer({"log_format": "hello", "log_level": LogLevel.info, "log_time": 0.0})
    assert json.loads((tmp_path / "gateway.log").read_text())["message"] == "hello"


def test_with_syslog_twistd_keeps_its_own_observer() -> None:
    gateway = MultiService()
    assert with_json_log(gateway, {"syslog": True}) is gateway
