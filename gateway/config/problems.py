"""What the loader reports: every problem at once, each named by its key path.

An admin fixing a config wants the whole list of mistakes in one run, so the
loader never stops at the first problem and never shows a traceback: it
collects `Problem`s and raises one `ConfigError` holding all of them. Things
that work but are unwise (a secret others can read) are `Problem`s too, kept
apart as warnings: they never stop the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the file; `path` is "" when it concerns the whole file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """The file cannot be used; `problems` lists every reason found.

    They come section by section in the order of the example file (state_dir,
    tls, pop3, providers, accounts, devices), then entry by entry in file order.

    `unreadable` says the file itself could not be opened: then the admin most
    needs to know how that file was chosen, and a command should say so.
    `warnings` are what would have been `Config.warnings` (readable secrets).
    """

    def __init__(
        self,
        source: Path,
        problems: list[Problem],
        *,
        unreadable: bool = False,
        warnings: list[Problem] | None = None,
    ) -> None:
        self.source = source
        self.problems = list(problems)
        self.unreadable = unreadable
        self.warnings = list(warnings or ())
        count = len(self.problems)
        lines = [f"{count} problem{'' if count == 1 else 's'} in {source}:"]
        lines += [f"  {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


def os_error(e: OSError) -> str:
    """An OS error as an admin reads it, without Python's errno prefix."""
    if isinstance(e, FileNotFoundError):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied (the gateway's user must be able to read it)"
    if isinstance(e, IsADirectoryError):
        return "is a directory, not a file"
    return e.strerror or type(e).__name__
