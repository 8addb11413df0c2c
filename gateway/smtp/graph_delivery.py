"""Relay through Microsoft Graph: each spooled message goes out with `sendMail`.

For tenants that switched SMTP AUTH off. A `GraphSession` stands where an
SMTP connection stands in the relay (`gateway.smtp.relay_session`): a lane
hands it one message at a time and gets an SMTP-style reply per recipient, so
retries, expiry, bounces and dead letters are the relay's, as for SMTP.

One message is one `POST /users/{account}/sendMail` with the MIME message
in base64 and `Content-Type: text/plain` (api/user-sendmail,
graph/outlook-send-mime-message), its To/Cc/Bcc first made to name exactly
the recipients still to deliver (`gateway.smtp.graph_recipients`: Graph has
no envelope). How Graph's answer counts:

- 202 Accepted: every recipient delivered ("the request has been accepted";
  Exchange's own delivery may still bounce to the sender's mailbox later);
- 429/503: waited out in line when `Retry-After` is at most `INLINE_WAIT`
  seconds (graph/throttling), else the attempt fails and the message is not
  tried again before `Retry-After` has passed (`SessionDeferred`);
- 401 (after one forced token refresh), 408, other 5xx, timeouts, a lost
  connection, a token that cannot be had: the attempt fails, retried with
  the relay's backoff (a 401 or a token problem is logged for the admin);
- 400 (e.g. ErrorMimeContentInvalidBase64String, bad MIME), 403
  (ErrorAccessDenied, ErrorSendAsDenied: a From the mailbox may not send
  as), 404 (no such mailbox), 413 and other 4xx: every recipient failed for
  good, so the sender gets a bounce and the message becomes a dead letter;
- a message over `GRAPH_MAX_MESSAGE` (spooled before the account moved to
  Graph) fails for good with 552 5.3.4 rather than be sent in a way Graph
  refuses.

Mail goes out as the account's mailbox (`/users/{username}`); a From the
device is allowed to use (`allowed_senders`) needs SendAs rights for that
mailbox in Exchange, which Graph checks. Graph keeps a copy in Sent Items.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from gateway.maildrop.graph import graph_http_client
from gateway.smtp.graph_recipients import match_envelope
from gateway.smtp.relay_path import GRAPH_MAX_MESSAGE, too_large_text
from gateway.smtp.relay_session import SessionDeferred
from gateway.upstream.errors import UpstreamError
from gateway.upstream.graph import (
    SHARED_SLOTS,
    GraphFailed,
    GraphHTTP,
    GraphMailbox,
    GraphNotFound,
    GraphRejected,
    GraphThrottled,
    GraphTokens,
    MailboxSlots,
)
from gateway.upstream.smtp import Reply, SMTPUpstreamError

if TYPE_CHECKING:
    from treq.client import HTTPClient
    from twisted.web.client import HTTPConnectionPool

    from gateway.model import Account, Provider

log = Logger(namespace="gateway.smtp.relay")

# Longest Retry-After waited out inside one attempt.
INLINE_WAIT = 30.0
# A sendMail request carries up to ~4 MB: give it more than a JSON call.
MIN_SEND_TIMEOUT = 60.0
RETRY_STATUSES = frozenset({401, 408})


class TokenUnavailable(UpstreamError):
    """No Graph token could be had for the account (refresh refused, offline)."""


def reply(code: int, text: str) -> Reply:
    return Reply(code, (text.encode("utf-8", "replace"),))


class GraphSession:
    """The relay's session for one Graph-relayed account (module doc)."""

    def __init__(
        self,
        mailbox: GraphMailbox,
        account: Account,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self.mailbox = mailbox
        self.account = account
        self._pool = pool
        self._ended = False
        self.peer = f"Microsoft Graph {urlsplit(mailbox.http.base_url).netloc}"

    @property
    def ended(self) -> bool:
        return self._ended

    def abort(self, reason: str) -> None:
        self.mailbox.cancel_all()
        self._close()

    def quit(self) -> Deferred[Any]:
        self._close()
        return succeed(None)

    def _close(self) -> None:
        self._ended = True
        if self._pool is not None:
            self._pool.closeCachedConnections()
            self._pool = None

    async def relay(
        self,
        *,
        sender: str,
        recipients: list[str],
        source: BinaryIO,
        size: int,
        eight_bit: bool,
    ) -> Mapping[str, Reply]:
        if size > GRAPH_MAX_MESSAGE:
            return dict.fromkeys(
                recipients, reply(552, "5.3.4 " + too_large_text(GRAPH_MAX_MESSAGE))
            )
        # The spool file holds the message, then the envelope: `size` octets only.
        mime = source.read(size)
        if len(mime) != size:
            raise SMTPUpstreamError(f"spool file shorter than the message ({len(mime)}/{size})")
        rewrite = match_envelope(mime, recipients)
        if rewrite.changed:
            log.info(
                "smtp graph relay for account {account}: recipient headers set to the envelope "
                "(dropped {dropped}, added as Bcc {added}, Bcc removed {removed})",
                account=self.account.name,
                dropped=",".join(rewrite.dropped) or "none",
                added=",".join(rewrite.added_bcc) or "none",
                removed=rewrite.removed_bcc,
            )
        try:
            await self.mailbox.send_mime(rewrite.message)
        except GraphThrottled as e:
            raise SessionDeferred(e.detail, retry_after=e.retry_after) from None
        except TokenUnavailable as e:
            raise SMTPUpstreamError(e.detail, admin=True) from None
        except GraphNotFound as e:
            return dict.fromkeys(
                recipients, reply(550, f"5.1.0 Graph: no such mailbox: {e.detail}")
            )
        except (GraphRejected, GraphFailed) as e:
            return self._refused(recipients, e)
        except UpstreamError as e:
            raise SMTPUpstreamError(e.detail) from None
        return dict.fromkeys(recipients, reply(250, "2.0.0 accepted by Microsoft Graph (202)"))

    def _refused(
        self, recipients: list[str], e: GraphRejected | GraphFailed
    ) -> Mapping[str, Reply]:
        status = e.status
        if status in RETRY_STATUSES or status >= 500:
            raise SMTPUpstreamError(e.detail, admin=status == 401) from None
        if status == 403:
            return dict.fromkeys(recipients, reply(550, f"5.7.1 {e.detail}"))
        if status == 413:
            return dict.fromkeys(recipients, reply(552, f"5.3.4 {e.detail}"))
        return dict.fromkeys(recipients, reply(554, f"5.6.0 {e.detail}"))


async def open_graph_session(
    account: Account,
    provider: Provider,
    *,
    reactor: Any,
    tokens: GraphTokens | None,
    http: HTTPClient | None = None,
    slots: MailboxSlots = SHARED_SLOTS,
) -> GraphSession:
    """A Graph session for the relay; nothing is requested until a message goes."""
    if account.auth != "oauth2" or tokens is None:
        raise SMTPUpstreamError(
            f"account {account.name} relays through Microsoft Graph, which needs "
            'auth = "oauth2" and the token manager',
            admin=True,
        )
    graph_tokens = tokens

    async def token(force: bool) -> str:
        try:
            return await graph_tokens.graph_token(account, force_refresh=force)
        except UpstreamError as e:
            raise TokenUnavailable(f"Graph token for {account.name}: {e.detail or e}") from None
        except Exception as e:
            raise TokenUnavailable(f"Graph token for {account.name}: {e}") from None

    pool = None
    if http is None:
        http, pool = graph_http_client(reactor, provider)
    mailbox = GraphMailbox(
        GraphHTTP(
            base_url=provider.graph_url,
            mailbox=account.username,
            token=token,
            http=http,
            clock=reactor,
            timeout=max(provider.timeout, MIN_SEND_TIMEOUT),
            retry_budget=INLINE_WAIT,
            slots=slots,
        )
    )
    return GraphSession(mailbox, account, pool)
