"""The embedded backend's state directory: tokens, spool, UIDL maps, all under one root.

Every writer goes through `atomic_write` so a crash or `kill -9` leaves either
the old file or the new one, never a torn one. The operator's config file is
never written.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import cattrs


class StateError(Exception):
    """The state directory or a file in it cannot be used; the text says why."""


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` if missing; refuse one that others can write to."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        info = path.stat()
    except OSError as e:
        raise StateError(f"state directory {path}: {e.strerror or e}") from None
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StateError(f"state directory {path} is writable by others; chmod go-w it")
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` via a temp file, fsync and rename, then fsync the dir."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def check_private(path: Path) -> None:
    """Refuse a secret file that group or others may read."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise StateError(f"{path} has mode {stat.filemode(mode)}; it must be 0600")


# -- typed JSON records ------------------------------------------------------------

T = TypeVar("T")


def _strict(kind: type[Any]) -> Callable[[Any, Any], Any]:
    """JSON types as they are: a string where a number belongs is damage, not
    something to convert (cattrs' own hooks would call `int(...)` on it)."""

    def structure(value: Any, _: Any) -> Any:
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


def _number(value: Any, _: Any) -> float:
    # JSON writes 30.0 as 30 in some encoders; both are the same float.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _is_collection(kind: Any) -> bool:
    return get_origin(kind) in (list, tuple, dict)


def json_records() -> cattrs.Converter:
    """A converter for the state directory's JSON records (dataclasses):
    exact types, every field without a default present, no unknown keys."""
    converter = cattrs.Converter(forbid_extra_keys=True)
    for kind in (str, int, bool):
        converter.register_structure_hook(kind, _strict(kind))
    converter.register_structure_hook(float, _number)

    def collection(value: Any, kind: Any) -> Any:
        # cattrs would take a string for a list of its characters.
        origin, args = get_origin(kind), get_args(kind)
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return {
                converter.structure(k, args[0]): converter.structure(v, args[1])
                for k, v in value.items()
            }
        if not isinstance(value, list):
            raise TypeError(f"expected an array, got {type(value).__name__}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"fixed-length tuples are not records: {kind}")
        items = [converter.structure(item, args[0]) for item in value]
        return tuple(items) if origin is tuple else items

    converter.register_structure_hook_func(_is_collection, collection)
    return converter


def encode_record(converter: cattrs.Converter, record: object) -> bytes:
    return json.dumps(converter.unstructure(record), separators=(",", ":")).encode()


def decode_record(converter: cattrs.Converter, data: bytes | str, cls: type[T]) -> T:
    """Parse and check one record; `ValueError` says what is wrong and where
    (`$.attempts: expected int, got str`), without the values themselves."""
    try:
        document = json.loads(data)
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise ValueError(f"$: expected a JSON object, got {type(document).__name__}")
    try:
        return converter.structure(document, cls)
    except cattrs.BaseValidationError as e:
        raise ValueError("; ".join(cattrs.transform_error(e))) from None
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"$: {e}") from None
