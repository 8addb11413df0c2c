"""Secrets kept in files of their own (`password_file`, `client_secret_file`),
so the config file itself can be readable by more people than the secrets."""

from __future__ import annotations

from pathlib import Path

from gateway.config.problems import os_error
from gateway.config.reader import Table
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
