"""`[log] format = "json"`: one JSON object per line instead of twistd's text.

Each line has the event's time, level, namespace and formatted message, and
then every field the event carries (a session's device, peer, account, tls,
cipher, outcome, bytes, duration; a delivery's id, account, recipients...)
as its own key, so a log shipper needs no pattern to take a line apart and a
peer-supplied value can never forge a second line: JSON escapes every
control character.

twistd picks its log observer after the plugin built the service: from
`--logger`, else from an `ILogObserver` component of the application, else
its own text file. `with_json_log` sets that component when twistd makes
the gateway's service a child of the application, writing where twistd
would have written (`--logfile`, or standard output with `--nodaemon`).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application.service import IService, MultiService
from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python import logfile
from twisted.python.components import Componentized

# What every line starts with; an event field of the same name is written
# as "field_<name>" so that neither hides the other.
META_KEYS = ("time", "level", "namespace", "message")


def _plain(value: Any) -> Any:
    """A JSON-safe form of one field. Anything unusual becomes its `str`, which
    for a `Secret` is its mask, never its value."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    return str(value)


def event_as_json_line(event: Mapping[str, Any]) -> str:
    when = event.get("log_time")
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": (
            datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
            if isinstance(when, int | float)
            else None
        ),
        "level": getattr(level, "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(dict(event)),
    }
    for key, value in event.items():
        if key.startswith("log_"):
            continue
        record[f"field_{key}" if key in META_KEYS else key] = _plain(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def json_log_observer(out: IO[str]) -> ILogObserver:
    return FileLogObserver(out, event_as_json_line)


def twistd_log_file(twistd_options: Mapping[str, Any] | None) -> IO[str] | None:
    """Where twistd would write its log for these options; None for syslog
    (which keeps twistd's own observer)."""
    options = twistd_options or {}
    if options.get("syslog"):
        return None
    name = options.get("logfile") or ""
    if name == "-" or (not name and options.get("nodaemon")) or twistd_options is None:
        return sys.stdout
    log_file: IO[str] = logfile.LogFile.fromFullPath(name or "twistd.log")
    return log_file


class LoggedService(MultiService):
    """The gateway's service tree (its one child) plus the log observer it
    brings for twistd's application."""

    def __init__(self, child: IService, observer: ILogObserver) -> None:
        super().__init__()
        self.observer = observer
        child.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


def with_json_log(service: IService, twistd_options: Mapping[str, Any] | None) -> IService:
    out = twistd_log_file(twistd_options)
    if out is None:
        return service
    return LoggedService(service, json_log_observer(out))
