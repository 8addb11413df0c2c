"""A Microsoft Graph mail emulator for tests and benchmarks, on 127.0.0.1.

No Graph server exists offline, so this one implements the calls the
gateway makes, as Microsoft documents them (learn.microsoft.com/graph):

- folders: `GET /users/{u}/mailFolders/{id | well-known name}`, and
  `GET .../mailFolders` / `.../mailFolders/{id}/childFolders` with
  `$filter=displayName eq '...'` (resources/mailfolder);
- `GET .../mailFolders/{id}/messages?$select&$top&$orderby`: pages of at most
  `$top` (default 10, 1..1000) with an `@odata.nextLink` carrying the query
  and a `$skip` (api/user-list-messages);
- `GET .../messages/{id}/$value`: the MIME content as stored
  (graph/outlook-get-mime-message);
- `POST .../messages/{id}/move` → 201 with the moved message, whose id is new
  unless the request sent `Prefer: IdType="ImmutableId"` (api/message-move,
  graph/outlook-immutable-id); `POST .../permanentDelete` → 204
  (api/message-permanentdelete); `PATCH .../messages/{id}` (categories,
  isRead) → 200 (api/message-update);
- errors as `{"error": {"code", "message"}}` (graph/errors): 401
  `InvalidAuthenticationToken`, 403 `ErrorAccessDenied`, 404
  `ErrorItemNotFound`, 400 `ErrorInvalidIdMalformed`;
- `POST /users/{u}/sendMail` with `Content-Type: text/plain` and the MIME
  message in base64 → 202 with no body; bad base64 → 400
  `ErrorMimeContentInvalidBase64String` "Invalid base64 string for MIME
  content." (api/user-sendmail). What was "sent" is kept in `sent`: the
  decoded MIME and the recipients Exchange takes from its To, Cc and Bcc
  fields; a copy goes to Sent Items ("This method saves the message in the
  Sent Items folder"). Bodies over `request_limit` (the ~4 MB Graph request
  limit) get 413. `send_delay` holds each answer back (crash tests);
- throttling: a fifth concurrent request to one mailbox gets 429
  "Application is over its MailboxConcurrency limit." with `Retry-After`
  (graph/throttling-limits, Outlook service limits; the error code
  `ApplicationThrottled` is what Microsoft Q&A threads show, not documented),
  and tests can queue 429/503 answers with `Retry-After` (`throttle`).

Bearer tokens: `check_token(token, mailbox, kind)` decides, returning None (ok) or
an (HTTP status, error code). `StaticTokens` is the simple check a test
controls; `IntrospectedTokens` asks the suite's authorization server (RFC
7662, tests/harness/oauth_server.py) and checks the user and a scope, since
that server issues opaque tokens without an audience.

Every request is counted (`counts` by kind, `requests` as (method, path,
prefer)). It runs in a thread of the test process (`GraphEmulator.start`):
its state is plain Python objects the test reads and changes under `lock`.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFER_IMMUTABLE = 'IdType="ImmutableId"'
WELL_KNOWN = ("inbox", "deleteditems", "drafts", "sentitems", "junkemail", "archive", "outbox")
DISPLAY = {
    "inbox": "Inbox",
    "deleteditems": "Deleted Items",
    "drafts": "Drafts",
    "sentitems": "Sent Items",
    "junkemail": "Junk Email",
    "archive": "Archive",
    "outbox": "Outbox",
}
CONCURRENCY_MESSAGE = "Application is over its MailboxConcurrency limit."

TokenCheck = Callable[[str, str, str], "tuple[int, str] | None"]
INVALID_BASE64 = "Invalid base64 string for MIME content."
REQUEST_LIMIT = 4 * 1024 * 1024


def _new_id(prefix: str, n: int) -> str:
    """Ids in Graph's style: long, case-sensitive, base64 with '-' and '_'."""
    raw = hashlib.sha256(f"{prefix}{n}".encode()).digest() * 3
    return "AAMkA" + base64.urlsafe_b64encode(raw).decode().rstrip("=") + "="


@dataclass
class Folder:
    id: str
    name: str
    parent: str | None
    well_known: str | None = None


@dataclass
class Message:
    immutable_id: str
    rest_id: str
    folder: str
    mime: bytes
    received: str
    categories: list[str] = field(default_factory=list)
    is_read: bool = False

    def resource(self, immutable: bool, select: list[str] | None = None) -> dict[str, Any]:
        full = {
            "id": self.immutable_id if immutable else self.rest_id,
            "receivedDateTime": self.received,
            "categories": list(self.categories),
            "isRead": self.is_read,
            "parentFolderId": self.folder,
            "subject": "",
        }
        if select:
            return {k: v for k, v in full.items() if k in select or k == "id"}
        return full


class Mailbox:
    def __init__(self, user: str) -> None:
        self.user = user
        self.folders: dict[str, Folder] = {}
        self.messages: list[Message] = []
        self._ids = itertools.count(1)
        root = self._folder("msgfolderroot", "Top of Information Store", None, "msgfolderroot")
        for name in WELL_KNOWN:
            self._folder(name, DISPLAY[name], root.id, name)

    def _folder(self, key: str, name: str, parent: str | None, well_known: str | None) -> Folder:
        folder = Folder(_new_id(f"{self.user}/folder/{key}", 0), name, parent, well_known)
        self.folders[folder.id] = folder
        return folder

    def well_known(self, name: str) -> Folder:
        return next(f for f in self.folders.values() if f.well_known == name)

    def folder_by_path(self, path: str) -> Folder:
        parts = path.strip("/").split("/")
        first = parts[0]
        if first.lower() in WELL_KNOWN:
            folder = self.well_known(first.lower())
        else:
            folder = self.child(self.well_known("msgfolderroot").id, first)
        for name in parts[1:]:
            folder = self.child(folder.id, name)
        return folder

    def child(self, parent: str, name: str) -> Folder:
        return next(f for f in self.folders.values() if f.parent == parent and f.name == name)

    def make_folder(self, path: str) -> Folder:
        """Create the folder `path` (and its parents), e.g. "Inbox/Scans"."""
        parts = path.strip("/").split("/")
        try:
            parent = self.folder_by_path(parts[0])
        except StopIteration:
            parent = self._folder(parts[0], parts[0], self.well_known("msgfolderroot").id, None)
        for n, name in enumerate(parts[1:], 2):
            try:
                parent = self.child(parent.id, name)
            except StopIteration:
                parent = self._folder("/".join(parts[:n]), name, parent.id, None)
        return parent

    def add(self, mime: bytes, folder: str = "inbox", received: str | None = None) -> Message:
        n = next(self._ids)
        message = Message(
            immutable_id=_new_id(f"{self.user}/immutable/", n),
            rest_id=_new_id(f"{self.user}/rest/{n}/", 0),
            folder=self.folder_by_path(folder).id,
            mime=mime,
            received=received or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(n)),
        )
        self.messages.append(message)
        return message

    def find(self, message_id: str) -> Message | None:
        for m in self.messages:
            if message_id in (m.immutable_id, m.rest_id):
                return m
        return None

    def in_folder(self, path: str) -> list[Message]:
        folder = self.folder_by_path(path).id
        return [m for m in self.messages if m.folder == folder]

    def move(self, message: Message, destination: Folder) -> None:
        message.folder = destination.id
        message.rest_id = _new_id(f"{self.user}/rest/moved/", next(self._ids))


@dataclass
class Sent:
    """One accepted sendMail: the decoded MIME and who Exchange would deliver to."""

    user: str
    mime: bytes
    recipients: list[str]
    sender: str
    at: float = field(default_factory=time.monotonic)


def mime_recipients(mime: bytes) -> list[str]:
    """The addresses of the To, Cc and Bcc fields, as Exchange reads a MIME send."""
    headers = BytesHeaderParser(policy=compat32).parsebytes(mime)
    values = [str(v) for name in ("to", "cc", "bcc") for v in headers.get_all(name, [])]
    return [addr for _, addr in getaddresses(values) if addr]


class StaticTokens:
    """Bearer tokens a test hands out itself: token -> mailbox it may use.
    `no_send`: tokens without Mail.Send."""

    def __init__(self, tokens: dict[str, str] | None = None, no_send: set[str] | None = None):
        self.tokens = dict(tokens or {})
        self.no_send = set(no_send or ())

    def __call__(self, token: str, mailbox: str, kind: str = "") -> tuple[int, str] | None:
        user = self.tokens.get(token)
        if user is None:
            return 401, "InvalidAuthenticationToken"
        if user.lower() != mailbox.lower():
            return 403, "ErrorAccessDenied"
        if kind == "sendMail" and token in self.no_send:
            return 403, "ErrorAccessDenied"
        return None


class IntrospectedTokens:
    """Tokens of the suite's authorization server, checked by RFC 7662
    introspection: active, issued for the mailbox's user, with `scope`."""

    def __init__(
        self,
        introspect_url: str,
        scope: str,
        cache_seconds: float = 30.0,
        send_scope: str | None = None,
    ) -> None:
        self.url = introspect_url
        self.scope = scope
        # sendMail needs this scope (Graph's Mail.Send) instead of `scope`.
        self.send_scope = send_scope
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def __call__(self, token: str, mailbox: str, kind: str = "") -> tuple[int, str] | None:
        with self._lock:
            cached = self._cache.get(token)
        if cached is None or time.monotonic() - cached[0] > self.cache_seconds:
            data = urllib.parse.urlencode({"token": token}).encode()
            with urllib.request.urlopen(self.url, data=data, timeout=10) as answer:
                info = json.loads(answer.read())
            cached = (time.monotonic(), info)
            with self._lock:
                self._cache[token] = cached
        info = cached[1]
        if not info.get("active"):
            return 401, "InvalidAuthenticationToken"
        if str(info.get("username", "")).lower() != mailbox.lower():
            return 403, "ErrorAccessDenied"
        scope = self.send_scope if kind == "sendMail" and self.send_scope else self.scope
        if scope not in str(info.get("scope", "")).split():
            return 403, "ErrorAccessDenied"
        return None


@dataclass
class Throttle:
    status: int
    retry_after: str | None
    kind: str | None


class GraphEmulator:
    """The emulator's state and its HTTP server (`start`/`stop`)."""

    def __init__(self, check_token: TokenCheck, *, concurrency: int = 4) -> None:
        self.check_token = check_token
        self.concurrency = concurrency
        self.concurrency_retry_after = "1"
        self.lock = threading.RLock()
        self.mailboxes: dict[str, Mailbox] = {}
        self.counts: Counter[str] = Counter()
        self.requests: list[tuple[str, str, bool]] = []
        self.throttles: list[Throttle] = []
        self.inflight: Counter[str] = Counter()
        self.max_inflight: Counter[str] = Counter()
        # Seconds each $value answer waits before its body (concurrency tests).
        self.value_delay = 0.0
        self.chunk_size = 64 * 1024
        self.sent: list[Sent] = []
        self.send_delay = 0.0
        self.request_limit = REQUEST_LIMIT
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- what a test does

    def mailbox(self, user: str) -> Mailbox:
        with self.lock:
            key = user.lower()
            if key not in self.mailboxes:
                self.mailboxes[key] = Mailbox(user)
            return self.mailboxes[key]

    def throttle(
        self,
        count: int = 1,
        *,
        status: int = 429,
        retry_after: str | None = "1",
        kind: str | None = None,
    ) -> None:
        """The next `count` requests (of `kind`: list, value, move, ...) get `status`."""
        with self.lock:
            self.throttles += [Throttle(status, retry_after, kind) for _ in range(count)]

    def reset_counts(self) -> None:
        with self.lock:
            self.counts.clear()
            self.requests.clear()
            self.max_inflight.clear()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1.0"

    def start(self) -> GraphEmulator:
        emulator = self

        class Handler(_Handler):
            graph = emulator

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> GraphEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/v1\.0/users/([^/]+)/mailFolders/([^/]+)/messages"), "list"),
    ("GET", re.compile(r"/v1\.0/users/([^/]+)/mailFolders/([^/]+)/childFolders"), "folders"),
    ("GET", re.compile(r"/v1\.0/users/([^/]+)/mailFolders"), "folders"),
    ("GET", re.compile(r"/v1\.0/users/([^/]+)/mailFolders/([^/]+)"), "folder"),
    ("GET", re.compile(r"/v1\.0/users/([^/]+)/messages/([^/]+)/\$value"), "value"),
    ("GET", re.compile(r"/v1\.0/users/([^/]+)/messages/([^/]+)"), "get"),
    ("POST", re.compile(r"/v1\.0/users/([^/]+)/messages/([^/]+)/move"), "move"),
    (
        "POST",
        re.compile(r"/v1\.0/users/([^/]+)/messages/([^/]+)/permanentDelete"),
        "permanentDelete",
    ),
    ("PATCH", re.compile(r"/v1\.0/users/([^/]+)/messages/([^/]+)"), "update"),
    ("POST", re.compile(r"/v1\.0/users/([^/]+)/sendMail"), "sendMail"),
]


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str = "", retry_after: str | None = None):
        super().__init__(code)
        self.status = status
        self.code = code
        self.message = message or code
        self.retry_after = retry_after


class _Handler(BaseHTTPRequestHandler):
    graph: GraphEmulator
    protocol_version = "HTTP/1.1"
    _kind = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # The handler writes headers and body separately: without this, Nagle
        # and the client's delayed ACK add 40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        parts = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parts.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        route = next(
            (
                (kind, m)
                for verb, rx, kind in _ROUTES
                if verb == method
                for m in [rx.fullmatch(path)]
                if m
            ),
            None,
        )
        graph = self.graph
        immutable = self.headers.get("Prefer", "") == PREFER_IMMUTABLE
        kind = route[0] if route else "unknown"
        self._kind = kind
        with graph.lock:
            graph.counts[kind] += 1
            graph.counts["total"] += 1
            graph.requests.append((method, self.path, immutable))
        if route is None:
            self._error(GraphError(400, "BadRequest", f"no route for {method} {path}"))
            return
        kind, match = route
        user = match.group(1)
        try:
            self._authorize(user)
        except GraphError as e:
            self._error(e)
            return
        key = user.lower()
        with graph.lock:
            throttle = next((t for t in graph.throttles if t.kind in (None, kind)), None)
            if throttle is not None:
                graph.throttles.remove(throttle)
            over = graph.inflight[key] >= graph.concurrency
            if not over and throttle is None:
                graph.inflight[key] += 1
                graph.max_inflight[key] = max(graph.max_inflight[key], graph.inflight[key])
        if throttle is not None:
            graph.counts["throttled"] += 1
            self._error(
                GraphError(
                    throttle.status,
                    "TooManyRequests" if throttle.status == 429 else "ServiceUnavailable",
                    "throttled (test)",
                    throttle.retry_after,
                )
            )
            return
        if over:
            graph.counts["concurrency"] += 1
            self._error(
                GraphError(
                    429, "ApplicationThrottled", CONCURRENCY_MESSAGE, graph.concurrency_retry_after
                )
            )
            return
        try:
            getattr(self, f"_{kind}")(graph.mailbox(user), match, query, body, immutable)
        except GraphError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with graph.lock:
                graph.inflight[key] -= 1

    def _authorize(self, user: str) -> None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:]:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        refused = self.graph.check_token(header[7:], user, self._kind)
        if refused is not None:
            raise GraphError(refused[0], refused[1], "token refused (emulator)")

    # -- routes

    def _folder_of(self, box: Mailbox, ref: str) -> Folder:
        if ref.lower() in WELL_KNOWN or ref.lower() == "msgfolderroot":
            return box.well_known(ref.lower())
        folder = box.folders.get(ref)
        if folder is None:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return folder

    def _message_of(self, box: Mailbox, ref: str) -> Message:
        message = box.find(ref)
        if message is None:
            raise GraphError(
                404, "ErrorItemNotFound", "The specified object was not found in the store."
            )
        return message

    def _folder(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        with self.graph.lock:
            f = self._folder_of(box, match.group(2))
            self._json(200, {"id": f.id, "displayName": f.name, "parentFolderId": f.parent})

    def _folders(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        with self.graph.lock:
            parent = (
                self._folder_of(box, match.group(2)).id
                if match.lastindex and match.lastindex >= 2
                else box.well_known("msgfolderroot").id
            )
            wanted = None
            filt = query.get("$filter")
            if filt:
                m = re.fullmatch(r"displayName eq '((?:[^']|'')*)'", filt)
                if m is None:
                    raise GraphError(400, "ErrorInvalidUrlQueryFilter", "unsupported $filter")
                wanted = m.group(1).replace("''", "'")
            found = [
                {"id": f.id, "displayName": f.name}
                for f in box.folders.values()
                if f.parent == parent and (wanted is None or f.name == wanted)
            ]
        self._json(200, {"value": found})

    def _list(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        top = int(query.get("$top", "10"))
        if not 1 <= top <= 1000:
            raise GraphError(400, "ErrorInvalidUrlQuery", "$top must be 1..1000")
        skip = int(query.get("$skip", "0"))
        select = query["$select"].split(",") if "$select" in query else None
        with self.graph.lock:
            folder = self._folder_of(box, match.group(2))
            items = [m for m in box.messages if m.folder == folder.id]
            if query.get("$orderby", "receivedDateTime desc").endswith("desc"):
                items.sort(key=lambda m: m.received, reverse=True)
            else:
                items.sort(key=lambda m: m.received)
            page = [m.resource(immutable, select) for m in items[skip : skip + top]]
        answer: dict[str, Any] = {"value": page}
        if skip + top < len(items):
            nxt = dict(query, **{"$skip": str(skip + top)})
            base = f"http://{self.headers['Host']}{urllib.parse.urlsplit(self.path).path}"
            answer["@odata.nextLink"] = base + "?" + urllib.parse.urlencode(nxt, safe="$,'")
        self._json(200, answer)

    def _get(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        with self.graph.lock:
            self._json(200, self._message_of(box, match.group(2)).resource(immutable))

    def _value(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        with self.graph.lock:
            mime = self._message_of(box, match.group(2)).mime
        if self.graph.value_delay:
            time.sleep(self.graph.value_delay)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(mime)))
        self.end_headers()
        view = memoryview(mime)
        for offset in range(0, len(mime), self.graph.chunk_size):
            self.wfile.write(view[offset : offset + self.graph.chunk_size])

    def _move(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        destination = json.loads(body or b"{}").get("destinationId")
        if not destination:
            raise GraphError(400, "ErrorInvalidRequest", "destinationId is required")
        with self.graph.lock:
            message = self._message_of(box, match.group(2))
            box.move(message, self._folder_of(box, destination))
            answer = message.resource(immutable)
        self._json(201, answer)

    def _permanentDelete(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        with self.graph.lock:
            box.messages.remove(self._message_of(box, match.group(2)))
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _update(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        changes = json.loads(body or b"{}")
        with self.graph.lock:
            message = self._message_of(box, match.group(2))
            if "categories" in changes:
                message.categories = [str(c) for c in changes["categories"]]
            if "isRead" in changes:
                message.is_read = bool(changes["isRead"])
            answer = message.resource(immutable)
        self._json(200, answer)

    def _sendMail(self, box, match, query, body, immutable) -> None:  # type: ignore[no-untyped-def]
        if len(body) > self.graph.request_limit:
            raise GraphError(413, "RequestEntityTooLarge", "request body too large")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "text/plain":
            raise GraphError(400, "ErrorInvalidRequest", "expected a JSON message")
        try:
            mime = base64.b64decode(body, validate=True)
        except ValueError:
            raise GraphError(400, "ErrorMimeContentInvalidBase64String", INVALID_BASE64) from None
        if not mime:
            raise GraphError(400, "ErrorMimeContentInvalidBase64String", INVALID_BASE64)
        sender = BytesHeaderParser(policy=compat32).parsebytes(mime).get("From", "")
        if self.graph.send_delay:
            time.sleep(self.graph.send_delay)
        with self.graph.lock:
            self.graph.sent.append(Sent(box.user, mime, mime_recipients(mime), str(sender)))
            box.add(mime, "sentitems")
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # -- answers

    def _json(
        self, status: int, value: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, text in (headers or {}).items():
            self.send_header(name, text)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: GraphError) -> None:
        headers = {"Retry-After": e.retry_after} if e.retry_after is not None else {}
        body = {
            "error": {
                "code": e.code,
                "message": e.message,
                "innerError": {"date": time.strftime("%Y-%m-%dT%H:%M:%S")},
            }
        }
        self._json(e.status, body, headers)


def messages_of(emulator: GraphEmulator, user: str, folder: str = "inbox") -> Iterator[bytes]:
    with emulator.lock:
        yield from (m.mime for m in emulator.mailbox(user).in_folder(folder))
