"""The Microsoft Graph mail calls the gateway makes, over `GraphHTTP`.

Each call is the documented one (learn.microsoft.com/graph/api/...):

- folders: a well-known name (`inbox`, `deleteditems`, ...) is addressed
  directly, `GET /users/{id}/mailFolders/{name}`; "Well-known names work
  regardless of the locale of the user's mailbox" (resources/mailfolder).
  A path "Inbox/Scans" is walked one level at a time through
  `.../mailFolders/{id}/childFolders?$filter=displayName eq '...'`
  (api/mailfolder-list-childfolders; hidden folders are not listed there,
  so they cannot be served), the first level below `.../mailFolders`.
- `list_messages`: `GET .../mailFolders/{id}/messages?$select=...&$top=...`;
  "$top ... within the range of 1 and 1000", and "To get the next page ...
  apply the entire URL returned in @odata.nextLink" (api/user-list-messages).
- `message_value`: `GET .../messages/{id}/$value`, the MIME content
  (graph/outlook-get-mime-message), streamed to a `BodyPump`.
- `move`: `POST .../messages/{id}/move {"destinationId": ...}`, 201 with the
  new message (api/message-move); `permanent_delete`: `POST
  .../messages/{id}/permanentDelete`, 204 (api/message-permanentdelete);
  `update`: `PATCH .../messages/{id}` with the properties to change
  (api/message-update), e.g. `categories`, `isRead`.
- `send_mime`: `POST /users/{id}/sendMail` with the MIME message in base64
  (api/user-sendmail, graph/outlook-send-mime-message), for the SMTP relay.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse
from zope.interface import implementer

from gateway.model import Account
from gateway.upstream.credentials import TokenSource
from gateway.upstream.errors import UpstreamLost, UpstreamUnavailable, describe_error
from gateway.upstream.graph.http import GraphHTTP, GraphNotFound

# api/resources/mailfolder, "Well-known folder names" (mail folders only).
WELL_KNOWN_FOLDERS = frozenset(
    {
        "archive",
        "clutter",
        "conflicts",
        "conversationhistory",
        "deleteditems",
        "drafts",
        "inbox",
        "junkemail",
        "localfailures",
        "msgfolderroot",
        "outbox",
        "recoverableitemsdeletions",
        "scheduled",
        "searchfolders",
        "sentitems",
        "serverfailures",
        "syncissues",
    }
)
PAGE_SIZE = 1000  # the largest $top the list call takes
_DONE = Failure(ResponseDone())


@runtime_checkable
class GraphTokens(Protocol):
    """What the token manager gives the Graph client: a token for Graph's resource."""

    async def graph_token(self, account: Account, *, force_refresh: bool = False) -> str: ...


class TokenSourceGraphTokens:
    """`GraphTokens` over today's `TokenSource`: the account's one access token.

    Right only where that token is already a Graph token (the provider's
    scopes are Graph's, or the test emulator). The token manager's own
    `graph_token` (a second resource per account, see the README) replaces it.
    """

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    async def graph_token(self, account: Account, *, force_refresh: bool = False) -> str:
        return await self._tokens.access_token(account, force_refresh=force_refresh)


def odata_string(text: str) -> str:
    """A string literal in an OData $filter: single quotes doubled."""
    return "'" + text.replace("'", "''") + "'"


@implementer(IPushProducer)
class BodyPump(TwistedProtocol):
    """Receives a streamed response body and hands it on, with back-pressure.

    `on_data(chunk)` returns False once it has all it wants (TOP): the
    connection is then dropped, so nothing more is read from Graph. While the
    pump runs it is the `consumer`'s producer: a device that reads slowly
    pauses the HTTP transport, so memory does not grow with the message.
    With `watch(clock, seconds)`, Graph going silent that long mid-body (while
    the device is not the one holding things up) ends the stream.
    """

    def __init__(self, on_data: Callable[[bytes], bool], consumer: IConsumer | None) -> None:
        self._on_data = on_data
        self._consumer = consumer
        self.done: Deferred[None] = Deferred()
        self.octets = 0
        self._finished = False
        self._registered = False
        self._paused = False
        self._clock: IReactorTime | None = None
        self._idle = 0.0
        self._timer: IDelayedCall | None = None

    def watch(self, clock: IReactorTime, seconds: float) -> None:
        self._clock, self._idle = clock, seconds

    def _arm(self) -> None:
        if self._clock is None or self._finished or self._paused:
            return
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle)
        else:
            self._timer = self._clock.callLater(self._idle, self._stalled)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _stalled(self) -> None:
        self._timer = None
        self._finish(
            Failure(UpstreamLost(f"Graph sent nothing for {self._idle:g} s during a message"))
        )
        self._stop_transport()

    def connectionMade(self) -> None:
        if self._consumer is not None:
            self._consumer.registerProducer(self, True)
            self._registered = True
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self._arm()
        self.octets += len(data)
        try:
            more = self._on_data(data)
        except Exception as e:
            self._finish(Failure(e))
            self._stop_transport()
            return
        if not more:
            self._finish(None)
            self._stop_transport()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finish(None)
        else:
            self._finish(
                Failure(UpstreamLost(f"Graph $value stream broke: {describe_error(reason.value)}"))
            )

    def _finish(self, result: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._disarm()
        if self._registered and self._consumer is not None:
            self._registered = False
            self._consumer.unregisterProducer()
        if result is None:
            self.done.callback(None)
        else:
            self.done.errback(result)

    def _producer(self) -> IPushProducer | None:
        # The agent hands the body protocol a TransportProxyProducer.
        return IPushProducer(self.transport, None) if self.transport is not None else None

    def _stop_transport(self) -> None:
        producer = self._producer()
        if producer is not None:
            producer.stopProducing()

    # IPushProducer, for the device side
    def pauseProducing(self) -> None:
        producer = self._producer()
        if producer is not None and not self._finished:
            self._paused = True
            self._disarm()
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        producer = self._producer()
        if producer is not None and not self._finished:
            self._paused = False
            self._arm()
            producer.resumeProducing()

    def stopProducing(self) -> None:
        if not self._finished:
            self._finish(Failure(UpstreamLost("the device went away during the message")))
            self._stop_transport()


class GraphMailbox:
    """The mail calls on one mailbox (`/users/{mailbox}`)."""

    def __init__(self, http: GraphHTTP) -> None:
        self.http = http
        self._user = f"/users/{quote(http.mailbox, safe='@')}"

    @property
    def stats(self) -> Any:
        return self.http.stats

    async def folder_id(self, path: str) -> str:
        """The id of a well-known folder or of a folder path such as "Inbox/Scans"."""
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            raise GraphNotFound(f"empty folder name {path!r}")
        first = parts[0]
        if first.lower() in WELL_KNOWN_FOLDERS:
            found = await self.http.json(
                "GET", f"{self._user}/mailFolders/{first.lower()}?$select=id", kind="folder"
            )
            folder = str(found.get("id", ""))
        else:
            folder = await self._child(f"{self._user}/mailFolders", first, path)
        for name in parts[1:]:
            folder = await self._child(
                f"{self._user}/mailFolders/{quote(folder, safe='')}/childFolders", name, path
            )
        if not folder:
            raise UpstreamUnavailable(f"Graph folder {path!r}: answer without an id")
        return folder

    async def _child(self, collection: str, name: str, path: str) -> str:
        query = quote(f"displayName eq {odata_string(name)}", safe="'=")
        found = await self.http.json(
            "GET", f"{collection}?$filter={query}&$select=id,displayName", kind="folder"
        )
        for item in found.get("value", []):
            if isinstance(item, dict) and item.get("displayName") == name and item.get("id"):
                return str(item["id"])
        raise GraphNotFound(f"Graph: no folder {name!r} (of {path!r}) in {self.http.mailbox}")

    async def list_messages(
        self, folder: str, select: Sequence[str], *, top: int = PAGE_SIZE
    ) -> list[dict[str, Any]]:
        """Every message of `folder` with the `select`ed properties, all pages."""
        fields = ",".join(select)
        link: str | None = (
            f"{self._user}/mailFolders/{quote(folder, safe='')}/messages"
            f"?$select={fields}&$top={top}&$orderby=receivedDateTime"
        )
        found: list[dict[str, Any]] = []
        while link:
            page = await self.http.json("GET", link, kind="list")
            found.extend(item for item in page.get("value", []) if isinstance(item, dict))
            next_link = page.get("@odata.nextLink")
            link = next_link if isinstance(next_link, str) else None
        return found

    async def message_value(self, message: str, pump: BodyPump) -> None:
        """Stream the MIME content of `message` into `pump` until it is done."""

        async def stream(response: IResponse) -> None:
            pump.watch(self.http.clock, self.http.timeout)
            response.deliverBody(pump)
            await pump.done

        await self.http.request(
            "GET", f"{self._message(message)}/$value", kind="value", then=stream
        )

    async def move(self, message: str, destination: str) -> str:
        """Move to `destination` (folder id or well-known name); the id after the move."""
        moved = await self.http.json(
            "POST", f"{self._message(message)}/move", {"destinationId": destination}, kind="move"
        )
        return str(moved.get("id", ""))

    async def permanent_delete(self, message: str) -> None:
        await self.http.json(
            "POST", f"{self._message(message)}/permanentDelete", kind="permanentDelete"
        )

    async def update(self, message: str, changes: dict[str, Any]) -> dict[str, Any]:
        return await self.http.json("PATCH", self._message(message), changes, kind="update")

    async def send_mime(self, mime: bytes) -> None:
        """`POST /users/{id}/sendMail` with the message as MIME: "provide the MIME
        content as a base64-encoded string in the request body", `Content-Type:
        text/plain`; "If successful, this method returns 202 Accepted"; bad
        base64 is 400 ErrorMimeContentInvalidBase64String (api/user-sendmail).
        The message is saved in Sent Items."""

        async def accepted(response: IResponse) -> None:
            response.deliverBody(_Discard())

        await self.http.request(
            "POST",
            f"{self._user}/sendMail",
            kind="sendMail",
            then=accepted,
            raw=(base64.b64encode(mime), b"text/plain"),
        )

    def cancel_all(self) -> None:
        self.http.cancel_all()

    def _message(self, message: str) -> str:
        return f"{self._user}/messages/{quote(message, safe='')}"


class _Discard(TwistedProtocol):
    """Reads an answer's body (202 has none) so the connection can be reused."""
