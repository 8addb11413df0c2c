"""One Microsoft Graph request, with the rules every request follows.

- `Prefer: IdType="ImmutableId"` on every request: "This header only applies
  to the request it is included with. If you want to always use immutable IDs,
  you must include this header with every API request."
  (https://learn.microsoft.com/graph/outlook-immutable-id)
- At most four requests in flight per mailbox: Outlook resources answer a
  fifth concurrent request with 429 "Application is over its
  MailboxConcurrency limit." (https://learn.microsoft.com/graph/throttling-limits,
  "Outlook service limits"). `MailboxSlots` holds one semaphore per mailbox,
  shared by every client of the process.
- 429 and 503 are retried after the `Retry-After` the answer carries
  ("Wait the number of seconds specified in the Retry-After header. Retry the
  request."; without the header, exponential backoff;
  https://learn.microsoft.com/graph/throttling#best-practices-to-handle-throttling).
  The caller bounds the total wait: a wait beyond it gives up at once with
  `UpstreamUnavailable` ([SYS/TEMP]) rather than outlast the device.
- A 401 gets one forced token refresh and one retry; errors are read from the
  JSON error body `{"error": {"code", "message"}}`
  (https://learn.microsoft.com/graph/errors) and mapped to the upstream error
  family: 401/403/400 → `UpstreamRejected` ([SYS/PERM]), 404 → `GraphNotFound`,
  everything transient → `UpstreamUnavailable`.
- Every exchange up to the response headers (and a JSON body) is bounded by a
  timeout on the injected clock; bodies streamed to a device are not, the
  device's own pace decides (back-pressure, see `client.BodyPump`).
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredSemaphore, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from gateway.upstream.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
    describe_error,
    printable,
)

PREFER_IMMUTABLE = 'IdType="ImmutableId"'
MAILBOX_CONCURRENCY = 4
# JSON answers of the calls we make are small (a page of 1000 ids is ~400 KB).
MAX_JSON = 8 * 1024 * 1024
# Without Retry-After: the first wait, doubled at each further attempt.
BACKOFF_FIRST = 1.0
RETRY_STATUSES = frozenset({429, 503})

# Gets a bearer token for the mailbox; True asks for a forced refresh.
TokenGetter = Callable[[bool], Awaitable[str]]


class GraphNotFound(UpstreamRejected):
    """404: the folder or message named does not exist (any more)."""

    device_text = "the mailbox folder does not exist, ask the administrator"


class GraphRejected(UpstreamRejected):
    """400/401/403: refused; `status` and Graph's error `code` say how."""

    def __init__(self, detail: str, status: int, code: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code_name = code


class GraphFailed(UpstreamUnavailable):
    """Any other unsuccessful status (5xx, 4xx other than the above and 404)."""

    def __init__(self, detail: str, status: int, code: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code_name = code


class GraphThrottled(UpstreamUnavailable):
    """429/503 whose Retry-After is longer than the caller can wait now."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class MailboxSlots:
    """The per-mailbox concurrency limit of one process (four requests)."""

    def __init__(self, limit: int = MAILBOX_CONCURRENCY) -> None:
        self.limit = limit
        self._slots: dict[str, DeferredSemaphore] = {}

    def for_mailbox(self, key: str) -> DeferredSemaphore:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = DeferredSemaphore(self.limit)
        return slot


SHARED_SLOTS = MailboxSlots()


@dataclass
class RequestStats:
    """What a session cost at Graph, for logs, tests and the benchmark."""

    requests: int = 0
    throttled: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.requests += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


def retry_after(headers: Headers, now: float) -> float | None:
    """Seconds from a Retry-After header: delay-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    value = headers.getRawHeaders(b"retry-after")
    if not value:
        return None
    text = value[0].decode("latin-1").strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def error_code(body: bytes) -> tuple[str, str]:
    """`error.code` and `error.message` of a Graph error body, or ("", "")."""
    try:
        data = json.loads(body)
        error = data["error"]
        return str(error.get("code", "")), str(error.get("message", ""))
    except (ValueError, TypeError, KeyError, AttributeError):
        return "", ""


class GraphHTTP:
    """Requests to one mailbox at one Graph endpoint, under its rules (module doc)."""

    def __init__(
        self,
        *,
        base_url: str,
        mailbox: str,
        token: TokenGetter,
        http: HTTPClient,
        clock: IReactorTime,
        timeout: float,
        retry_budget: float,
        slots: MailboxSlots = SHARED_SLOTS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.mailbox = mailbox
        self._origin = _origin(self.base_url)
        self._token = token
        self._http = http
        self.clock = clock
        self.timeout = timeout
        self.retry_budget = retry_budget
        self._slot = slots.for_mailbox(f"{self._origin}\0{mailbox.lower()}")
        self.stats = RequestStats()
        self._inflight: set[Deferred[Any]] = set()

    def url(self, path: str) -> str:
        """An absolute URL: `path` below the base, or a nextLink as given."""
        if path.startswith(("https://", "http://")):
            if _origin(path) != self._origin:
                raise UpstreamUnavailable(
                    f"Graph sent a link to another host ({_origin(path)}); not following it"
                )
            return path
        return f"{self.base_url}{path}"

    async def json(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, kind: str
    ) -> dict[str, Any]:
        """A call whose answer is a JSON object (or empty, as for 204)."""

        async def read(response: IResponse) -> dict[str, Any]:
            data = await self._bounded(_read_body(response, MAX_JSON), "reading the answer")
            if not data.strip():
                return {}
            try:
                value = json.loads(data)
            except ValueError:
                raise UpstreamUnavailable(
                    f"Graph {kind}: answer is not JSON: {printable(data, 80)}"
                ) from None
            if not isinstance(value, dict):
                raise UpstreamUnavailable(f"Graph {kind}: answer is not a JSON object")
            return value

        answer: dict[str, Any] = await self.request(method, path, body, kind=kind, then=read)
        return answer

    async def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        kind: str,
        then: Callable[[IResponse], Awaitable[Any]],
        raw: tuple[bytes, bytes] | None = None,
    ) -> Any:
        """Send until answered 2xx (retrying 429/503 and one 401), then `then(response)`
        inside the request's concurrency slot. `raw` is a body and its
        content type, instead of a JSON `body`."""
        url = self.url(path)
        waited = 0.0
        backoff = BACKOFF_FIRST
        forced = False
        while True:
            await self._slot.acquire()
            try:
                token = await self._token(forced)
                self.stats.count(kind)
                response = await self._bounded(self._send(method, url, body, token, raw), kind)
                status = response.code
                if 200 <= status < 300:
                    return await then(response)
                data = await self._bounded(_read_body(response, 64 * 1024), kind)
            finally:
                self._slot.release()
            code, message = error_code(data)
            what = f"Graph {kind} {method} {_short(url)}: HTTP {status} {code}".rstrip()
            if status == 401 and not forced:
                forced = True
                continue
            if status in RETRY_STATUSES:
                self.stats.throttled += 1
                wait = retry_after(response.headers, self.clock.seconds())
                if wait is None:
                    wait, backoff = backoff, backoff * 2
                if waited + wait > self.retry_budget:
                    raise GraphThrottled(
                        f"{what}; Retry-After {wait:g} s would exceed the {self.retry_budget:g} s "
                        f"the caller can wait (waited {waited:g} s)",
                        wait,
                    )
                waited += wait
                await self._sleep(wait)
                continue
            raise _refusal(status, f"{what}: {printable(message.encode(), 160)}", code)

    async def _send(
        self,
        method: str,
        url: str,
        body: Mapping[str, Any] | None,
        token: str,
        data: tuple[bytes, bytes] | None = None,
    ) -> IResponse:
        headers = Headers(
            {
                b"Authorization": [b"Bearer " + token.encode("ascii", "replace")],
                b"Prefer": [PREFER_IMMUTABLE.encode()],
                b"Accept": [b"application/json"],
            }
        )
        kwargs: dict[str, Any] = {"headers": headers, "allow_redirects": False, "unbuffered": True}
        if body is not None:
            kwargs["json"] = dict(body)
        if data is not None:
            headers.setRawHeaders(b"Content-Type", [data[1]])
            kwargs["data"] = data[0]
        try:
            response: IResponse = await self._http.request(method, url, **kwargs)
        except UpstreamError:
            raise
        except Exception as e:
            raise UpstreamUnavailable(f"Graph {_short(url)}: {describe_error(e)}") from None
        return response

    async def _bounded(self, step: Awaitable[Any], what: str) -> Any:
        """`step`, cancelled after `timeout` seconds on the injected clock."""
        running = ensureDeferred(_await(step))
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            running.cancel()

        timer = self.clock.callLater(self.timeout, give_up)
        self._inflight.add(running)
        try:
            return await running
        except Exception as e:
            if timed_out:
                raise UpstreamUnavailable(
                    f"Graph {what}: no answer within {self.timeout:g} s"
                ) from None
            if isinstance(e, UpstreamError):
                raise
            raise UpstreamUnavailable(f"Graph {what}: {describe_error(e)}") from None
        finally:
            self._inflight.discard(running)
            if timer.active():
                timer.cancel()

    async def _sleep(self, seconds: float) -> None:
        waiting: Deferred[None] = deferLater(self.clock, seconds, lambda: None)
        self._inflight.add(waiting)
        try:
            await waiting
        except Exception:
            raise UpstreamUnavailable("Graph: session ended waiting for Retry-After") from None
        finally:
            self._inflight.discard(waiting)

    def cancel_all(self) -> None:
        """Abandon every request in flight (the device went away)."""
        for pending in list(self._inflight):
            pending.cancel()


async def _await(step: Awaitable[Any]) -> Any:
    return await step


async def _read_body(response: IResponse, limit: int) -> bytes:
    from treq import collect

    parts: list[bytes] = []
    size = 0

    def keep(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise UpstreamUnavailable(f"Graph answer larger than {limit} octets")
        parts.append(data)

    await collect(response, keep)
    return b"".join(parts)


def _refusal(status: int, detail: str, code: str = "") -> UpstreamError:
    if status == 404:
        return GraphNotFound(detail)
    if status in (400, 401, 403):
        return GraphRejected(detail, status, code)
    return GraphFailed(detail, status, code)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _short(url: str) -> str:
    """A URL for a log line: path only (ids are long, queries add nothing)."""
    path = urlsplit(url).path
    return path if len(path) <= 120 else path[:117] + "..."
