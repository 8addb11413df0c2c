"""What every upstream maildrop does between login and handing the session out."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from gateway.upstream.connection import Abortable, or_abort
from gateway.upstream.errors import UpstreamLost, UpstreamUnavailable

_T = TypeVar("_T")


async def at_open(client: Abortable, step: Awaitable[_T], why: str) -> _T:
    """A maildrop's first look after login (the snapshot); on failure the client is dropped.

    The device has no session yet: to it a connection lost now is a failed
    login (`UpstreamUnavailable`), not a session that broke (`UpstreamLost`).
    """
    try:
        return await or_abort(client, step, why)
    except UpstreamLost as e:
        raise UpstreamUnavailable(e.detail) from None
