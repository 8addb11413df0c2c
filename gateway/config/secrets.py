"""Secrets kept in files of their own (`password_file`, `client_secret_file`),
so the config file itself can be readable by more people than the secrets,
and the file modes that keep secrets and state to the gateway's user.

A secret readable by group or others is a warning, not a problem: some sites
share a TLS key with a group on purpose (Debian's ssl-cert), and refusing to
start over it would stop mail. A state directory others can write is a
problem: whoever can write there can plant spool messages the relay sends as
any account, or swap a token file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gateway.config.problems import os_error
from gateway.config.reader import Reader, Table
from gateway.model import Secret


def read_secret_file(table: Table, key: str, path: Path) -> Secret | None:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        table.problem(key, f"{path}: {os_error(e)}")
        return None
    except UnicodeDecodeError:
        table.problem(key, f"{path}: not UTF-8 text")
        return None
    # Editors and `echo` add a final newline that is no part of the secret.
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret:
        table.problem(key, f"{path}: is empty")
        return None
    return Secret(secret)


def readable_by_others(path: Path) -> str | None:
    """Who besides the owner may read `path` ("group", "others", "group and
    others"), with its mode; None if nobody, or if it cannot be looked at."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    who = [name for bit, name in ((stat.S_IRGRP, "group"), (stat.S_IROTH, "others")) if mode & bit]
    if not who:
        return None
    return f"readable by {' and '.join(who)} (mode {stat.filemode(mode)})"


def check_secret_file(table: Table, key: str, path: Path) -> None:
    """Warn about a secret file anyone but the gateway's user can read."""
    readable = readable_by_others(path)
    if readable is not None:
        table.reader.warn(table.at(key), f"{path} holds a secret but is {readable}; chmod go-r it")


def check_config_file(reader: Reader, source: Path) -> None:
    """Warn when the config itself holds a secret (an inline `password`) and
    others can read it."""
    readable = readable_by_others(source) if reader.inline_secrets else None
    if readable is not None:
        reader.warn(
            "",
            f"the file holds upstream passwords ({', '.join(reader.inline_secrets)}) but is "
            f"{readable}; chmod go-r it, or move them to password_file",
        )


def check_state_dir(table: Table, key: str, path: Path) -> None:
    """Refuse a state directory that group or others may write. A missing one
    is created 0700 at start; its parents are the admin's business."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        table.problem(key, f"{path}: {e.strerror or e}")
        return
    if not stat.S_ISDIR(info.st_mode):
        table.problem(key, f"{path}: not a directory")
        return
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        table.problem(
            key,
            f"{path} is writable by group or others (mode {stat.filemode(info.st_mode)}), "
            "who could then plant mail in the spool or replace token files; chmod go-w it",
        )
