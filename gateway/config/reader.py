"""The typed table reader every section goes through.

Reading goes through `Table`, a small reader that remembers which keys were
asked for. Keys nobody asked for are reported as unknown, because a misspelt
key that is silently ignored (say `alow_from`) leaves a device open to every
network while the admin believes otherwise.

Each getter has one precise return type, `T | None`: None when the key is
absent with a None default, or after a problem was reported. The section
builders must therefore narrow every value before they build a model object,
and mypy checks that they do (a `bool | None` cannot reach a `bool` field).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway.config.problems import Problem
from gateway.model import Listener

_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")
# Names become POP3 user names and words in log lines: one token each.
TOKEN: Final = re.compile(r"[^\s\x00-\x1f\x7f]+")

C = TypeVar("C", bound=str)


class Required:
    """The default of a key that must be present."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Final = Required()
_INVALID: Final[Any] = object()


def key_path(parent: str, key: str) -> str:
    """Spell a key path as it would be written in TOML, quoting unusual keys."""
    if not _BARE_KEY.fullmatch(key):
        key = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{parent}.{key}" if parent else key


def kind(value: object) -> str:
    """Name a value's type as the TOML spec does: the admin never wrote Python."""
    if isinstance(value, bool):
        return "a boolean"
    names = {
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), "a date/time")


class Reader:
    """What all tables of one file share: the problem list and the base directory."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        # Unwise but workable (a secret others can read): reported, never fatal.
        self.warnings: list[Problem] = []
        # Key paths of secrets written in the file itself (inline passwords).
        self.inline_secrets: list[str] = []
        # Every listener built, POP3 and SMTP alike, with its key path: two on
        # one port clash whatever their protocol.
        self.listeners: list[tuple[str, Listener]] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(Problem(path, message))

    def mark(self) -> int:
        return len(self.problems)

    def clean_since(self, mark: int) -> bool:
        """Whether nothing went wrong since `mark`: only then is an object built."""
        return len(self.problems) == mark


class Table:
    """One TOML table being read, named by its key path in problems.

    `valid` is False for a stand-in for a value that was not a table: its
    missing keys are not worth a second report.
    """

    def __init__(
        self, data: Mapping[str, Any], path: str, reader: Reader, *, valid: bool = True
    ) -> None:
        self.data = data
        self.path = path
        self.reader = reader
        self.valid = valid
        self._seen: set[str] = set()

    def at(self, key: str) -> str:
        return key_path(self.path, key)

    def problem(self, key: str | None, message: str) -> None:
        self.reader.add(self.at(key) if key is not None else self.path, message)

    def has(self, key: str) -> bool:
        """Whether the key is present; asking makes it a known key, so that a
        misspelling of it is not just unknown but gets a "did you mean"."""
        self._seen.add(key)
        return key in self.data

    def _take(self, key: str, default: object, wanted: tuple[type, ...], expected: str) -> Any:
        """The raw value, `default` if absent, `_INVALID` once reported as wrong."""
        self._seen.add(key)
        if key not in self.data:
            if default is not REQUIRED:
                return default
            if self.valid:
                self.problem(key, "required key is missing")
            return _INVALID
        value = self.data[key]
        # bool is an int to Python, but `port = true` is not a port to anyone.
        if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
            self.problem(key, f"expected {expected}, got {kind(value)}")
            return _INVALID
        return value

    def string(self, key: str, default: str | Required | None = REQUIRED) -> str | None:
        value = self._take(key, default, (str,), "a string")
        if value is _INVALID or value is None:
            return None
        if not self.has(key):
            return str(value)  # the default, taken as given
        if value == "":
            self.problem(key, "is empty")
            return None
        return str(value)

    def choice(
        self, key: str, choices: tuple[C, ...], default: C | Required | None = REQUIRED
    ) -> C | None:
        """One of `choices` (a model `Literal`'s values), as that type."""
        # min_tls = 1.2 parses as a float: show that quotes are needed.
        expected = "one of " + ", ".join(f'"{choice}"' for choice in choices)
        value = self._take(key, default, (str,), expected)
        if value is _INVALID or value is None:
            return None
        for choice in choices:
            if value == choice:
                return choice
        self.problem(key, f"must be one of {', '.join(choices)} (got {value!r})")
        return None

    def secret(self, key: str, default: Required | None = REQUIRED) -> str | None:
        """A string whose value must not appear in any message."""
        value = self._take(key, default, (str,), "a string")
        if value is _INVALID or value is None:
            return None
        if value == "":
            self.problem(key, "is empty")
            return None
        return str(value)

    def integer(
        self, key: str, default: int | Required | None = REQUIRED, *, low: int, high: int
    ) -> int | None:
        value = self._take(key, default, (int,), "an integer")
        if value is _INVALID or value is None:
            return None
        if not self.has(key):
            return int(value)  # the default, taken as given
        if not low <= value <= high:
            self.problem(key, f"must be between {low} and {high} (got {value})")
            return None
        return int(value)

    def seconds(self, key: str, default: float) -> float | None:
        """A positive duration; `30` and `30.0` both mean thirty seconds."""
        value = self._take(key, default, (int, float), "a number of seconds")
        if value is _INVALID:
            return None
        if not (value > 0 and math.isfinite(value)):
            self.problem(key, f"must be a finite number greater than 0 (got {value})")
            return None
        return float(value)

    def boolean(self, key: str, default: bool) -> bool | None:
        value = self._take(key, default, (bool,), "true or false")
        return None if value is _INVALID else bool(value)

    def file(self, key: str, default: Path | Required | None = REQUIRED) -> Path | None:
        """A path, taken relative to the config file's directory unless absolute,
        so that a config and its secrets can move together."""
        fallback: Required | None
        if isinstance(default, Path):
            if not self.has(key):
                return default
            fallback = None
        else:
            fallback = default
        value = self.string(key, fallback)
        return None if value is None else self.reader.base_dir / value

    def existing_file(self, key: str, default: Required | None = REQUIRED) -> Path | None:
        """A path that must name a regular file. Checked here so the message is
        the same plain "file not found" whichever loader opens it later."""
        path = self.file(key, default)
        if path is None:
            return None
        if not path.exists():
            self.problem(key, f"{path}: file not found")
            return None
        if not path.is_file():
            self.problem(key, f"{path}: not a regular file")
            return None
        return path

    def strings(self, key: str) -> Iterator[tuple[str, str]]:
        """An array of strings as (item path, value) pairs, so that each item
        is blamed by its own index. Lazy, so problems come out in item order;
        items that are not strings are reported and skipped."""
        value = self._take(key, [], (list,), "an array of strings")
        if value is _INVALID:
            return
        for index, item in enumerate(value):
            path = f"{self.at(key)}[{index}]"
            if isinstance(item, str):
                yield path, item
            else:
                self.reader.add(path, f"expected a string, got {kind(item)}")

    def table(self, key: str) -> Table:
        """A sub-table; an absent one reads as empty so that its defaults apply."""
        value = self._take(key, {}, (dict,), "a table")
        if value is _INVALID:
            return Table({}, self.at(key), self.reader, valid=False)
        return Table(value, self.at(key), self.reader)

    def tables(self, key: str) -> Iterator[Table]:
        """An array of tables (`[[pop3.listen]]`), each named by its index."""
        value = self._take(key, [], (list,), f"an array of tables, written [[{self.at(key)}]]")
        if value is _INVALID:
            return
        for index, item in enumerate(value):
            path = f"{self.at(key)}[{index}]"
            if isinstance(item, dict):
                yield Table(item, path, self.reader)
            else:
                self.reader.add(path, f"expected a table, got {kind(item)}")

    def entries(self) -> Iterator[tuple[str, Table]]:
        """Each entry of a table of named things (`[devices.NAME]`)."""
        for name, value in self.data.items():
            self._seen.add(name)
            if not TOKEN.fullmatch(name):
                self.problem(name, "a name must be non-empty and contain no spaces")
            elif not isinstance(value, dict):
                self.problem(name, f"expected a table, got {kind(value)}")
            else:
                yield name, Table(value, self.at(name), self.reader)

    def finish(self) -> None:
        """Report every key that nothing asked for."""
        known = sorted(self._seen)
        for key in self.data:
            if key not in self._seen:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                self.problem(key, f"unknown key{hint}")
