"""The relay's Graph path on a fake clock: each message is one sendMail with
the MIME in base64, 202 settles it, Retry-After is honoured (in line when
short, as the next attempt's earliest time when long), refusals bounce and
leave a dead letter through the relay's own logic, and a message over Graph's
size never reaches Graph."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.logger import formatEvent, globalLogPublisher

from gateway.config import ConfigError, load_config
from gateway.model import Account, Provider
from gateway.smtp.graph_delivery import INLINE_WAIT, GraphSession, open_graph_session
from gateway.smtp.relay import Relay, RetryPolicy
from gateway.smtp.relay_path import GRAPH_MAX_MESSAGE, message_size_limit, relays_via_graph
from gateway.smtp.spool import QueueEntry
from gateway.upstream.errors import UpstreamRejected
from gateway.upstream.graph import MailboxSlots
from tests.unit.test_graph_client import FakeResponse
from tests.unit.test_smtp_relay import T0, Harness

ACCOUNT = Account("scanner", "m365", "scanner@example.com", auth="oauth2", mailbox="graph")
PROVIDER = Provider("m365", graph_url="https://graph.example/v1.0")
MESSAGE = b"From: dev@scan.example.com\r\nTo: a@example.org\r\nSubject: report\r\n\r\nbody\r\n"


class Tokens:
    def __init__(self) -> None:
        self.asked: list[bool] = []
        self.refused: str | None = None

    async def graph_token(self, account: Account, *, force_refresh: bool = False) -> str:
        self.asked.append(force_refresh)
        if self.refused is not None:
            raise UpstreamRejected(self.refused)
        return "graph-token"


class GraphHTTPFake:
    """Answers from a queue, then 202; records every request."""

    def __init__(self) -> None:
        self.answers: list[FakeResponse] = []
        self.requests: list[dict[str, Any]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests.append({"method": method, "url": url, **kwargs})
        return succeed(self.answers.pop(0) if self.answers else FakeResponse(202))

    def sent(self) -> list[bytes]:
        return [base64.b64decode(r["data"], validate=True) for r in self.requests]


class GraphHarness(Harness):
    def __init__(self, tmp_path: Path, retry: RetryPolicy | None = None) -> None:
        self.http = GraphHTTPFake()
        self.tokens = Tokens()
        super().__init__(tmp_path, retry)
        self.account = ACCOUNT

    def _relay(self, retry: RetryPolicy, connections: int) -> Relay:
        async def open_session(account: Account, provider: Provider) -> GraphSession:
            return await open_graph_session(
                account,
                provider,
                reactor=self.clock,
                tokens=self.tokens,
                http=self.http,  # type: ignore[arg-type]
                slots=MailboxSlots(),
            )

        return Relay(
            spool=self.spool,
            accounts={"scanner": ACCOUNT},
            providers={"m365": PROVIDER},
            open_session=open_session,
            clock=self.clock,
            hostname="gw.test",
            retry=retry,
            keepalive=2.0,
        )

    def settle(self) -> None:
        for _ in range(50):
            self.clock.advance(0)


@pytest.fixture
def relay_log() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("gateway.smtp"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


@pytest.fixture
def g(tmp_path: Path) -> Iterator[GraphHarness]:
    harness = GraphHarness(tmp_path)
    yield harness
    if harness.relay.running:
        harness.stop()


def dead(h: GraphHarness) -> list[QueueEntry]:
    return [e for e in h.dir.scan() if e.status == "dead"]


def test_graph_is_the_default_without_smtp_for_graph_mailboxes() -> None:
    assert relays_via_graph(ACCOUNT, PROVIDER)
    assert not relays_via_graph(Account("x", "p", "x@example.com"), PROVIDER)
    smtp_too = Provider("m365", graph_url="https://g/v1.0", smtp=None)
    assert not relays_via_graph(Account("x", "p", "x", relay="smtp", mailbox="graph"), smtp_too)


def test_one_sendmail_per_message_as_base64_mime(g: GraphHarness) -> None:
    entry = g.queue(MESSAGE, recipients=("a@example.org",))
    g.start()
    [request] = g.http.requests
    assert request["method"] == "POST"
    assert request["url"] == "https://graph.example/v1.0/users/scanner@example.com/sendMail"
    assert request["headers"].getRawHeaders(b"content-type") == [b"text/plain"]
    assert request["headers"].getRawHeaders(b"authorization") == [b"Bearer graph-token"]
    assert g.http.sent() == [MESSAGE]  # headers already match the envelope: byte for byte
    assert entry.id not in g.spool.entries and g.spool.entries == {}


def test_envelope_only_recipient_is_added_as_bcc(g: GraphHarness) -> None:
    g.queue(MESSAGE, recipients=("a@example.org", "bcc@example.net"))
    g.start()
    assert g.http.sent() == [
        MESSAGE.replace(b"report\r\n\r\n", b"report\r\nBcc: <bcc@example.net>\r\n\r\n")
    ]


def test_short_retry_after_is_waited_out_in_line(g: GraphHarness) -> None:
    g.http.answers = [
        FakeResponse(429, {"error": {"code": "TooManyRequests"}}, {"Retry-After": "7"})
    ]
    entry = g.queue(MESSAGE, recipients=("a@example.org",))
    g.start()
    assert len(g.http.requests) == 1 and entry.id in g.spool.entries
    g.advance(6.9)
    assert len(g.http.requests) == 1
    g.advance(0.2)
    assert len(g.http.requests) == 2 and g.spool.entries == {}
    assert entry.state.attempts == 0


def test_long_retry_after_sets_the_next_attempt(g: GraphHarness, relay_log: list[str]) -> None:
    wait = INLINE_WAIT * 4
    g.http.answers = [FakeResponse(429, {}, {"Retry-After": str(int(wait))})]
    entry = g.queue(MESSAGE, recipients=("a@example.org",))
    g.start()
    assert entry.state.attempts == 1 and entry.state.next_attempt == T0 + wait
    g.advance(wait - 1)
    assert len(g.http.requests) == 1
    g.advance(1)
    assert len(g.http.requests) == 2 and g.spool.entries == {}
    assert any("smtp deferred" in line and "Retry-After 120" in line for line in relay_log)


def test_server_error_is_retried_with_the_relay_backoff(g: GraphHarness) -> None:
    g.http.answers = [FakeResponse(500, {"error": {"code": "InternalServerError"}})]
    entry = g.queue(MESSAGE, recipients=("a@example.org",))
    g.start()
    assert entry.state.attempts == 1 and entry.state.next_attempt == T0 + 30
    g.advance(30)
    assert g.spool.entries == {} and len(g.http.requests) == 2


def test_unauthorized_after_a_refresh_is_retried(g: GraphHarness) -> None:
    refused = FakeResponse(401, {"error": {"code": "InvalidAuthenticationToken"}})
    g.http.answers = [refused, FakeResponse(401, {"error": {"code": "InvalidAuthenticationToken"}})]
    entry = g.queue(MESSAGE, recipients=("a@example.org",))
    g.start()
    assert g.tokens.asked == [False, True]
    assert entry.state.attempts == 1 and not dead(g)


def test_token_trouble_is_one_error_line_until_it_is_over(
    g: GraphHarness, relay_log: list[str]
) -> None:
    g.tokens.refused = "AADSTS700082: the refresh token has expired"
    entry = g.queue(MESSAGE, recipients=("a@example.org",))
    g.start()
    g.advance(30)
    assert entry.state.attempts == 2 and g.http.requests == [] and not dead(g)
    errors = [line for line in relay_log if "upstream problem" in line and "persists" not in line]
    assert len(errors) == 1 and "AADSTS700082" in errors[0]
    g.tokens.refused = None
    g.advance(60)
    assert g.spool.entries == {}
    assert any("works again" in line for line in relay_log)


@pytest.mark.parametrize(
    ("status", "code", "enhanced"),
    [
        (400, "ErrorMimeContentInvalidBase64String", "5.6.0"),
        (403, "ErrorSendAsDenied", "5.7.1"),
        (413, "RequestEntityTooLarge", "5.3.4"),
    ],
)
def test_refusal_bounces_and_leaves_a_dead_letter(
    g: GraphHarness,
    relay_log: list[str],
    status: int,
    code: str,
    enhanced: str,
) -> None:
    g.http.answers = [FakeResponse(status, {"error": {"code": code, "message": "no"}})]
    entry = g.queue(MESSAGE, recipients=("a@example.org",))
    g.start()
    [letter] = [e for e in dead(g) if e.id == entry.id]
    assert code in (letter.state.dead_reason or "")
    # The bounce to the device's sender goes out through Graph as well.
    bounce = g.http.sent()[1]
    assert f"Status: {enhanced}".encode() in bounce
    assert b"To: <dev@scan.example.com>" in bounce and b"Bcc:" not in bounce
    assert any("dead letter" in line for line in relay_log)


def test_oversize_message_is_never_sent(g: GraphHarness) -> None:
    big = MESSAGE + b"x" * GRAPH_MAX_MESSAGE
    entry = g.queue(big, recipients=("a@example.org",))
    g.start()
    assert [e.id for e in dead(g)] == [entry.id]
    [bounce] = g.http.sent()
    assert b"Status: 5.3.4" in bounce and b"Microsoft Graph" in bounce


# -- configuration -------------------------------------------------------------------------

CONFIG = """\
state_dir = "state"

[providers.m365]
graph_url = "https://graph.example/v1.0"

[providers.m365.oauth]
token_url = "https://login.example/token"
client_id = "gw"
device_authorization_url = "https://login.example/device"

[accounts.scanner]
provider = "m365"
username = "scans@contoso.example"
auth = "oauth2"
{extra}
"""


def load(tmp_path: Path, extra: str) -> Any:
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG.format(extra=extra))
    return load_config(path)


def test_relay_and_save_to_sent_keys(tmp_path: Path) -> None:
    account = load(tmp_path, 'mailbox = "graph"').accounts["scanner"]
    assert account.relay is None and account.save_to_sent
    assert relays_via_graph(account, PROVIDER)
    explicit = load(tmp_path, 'relay = "graph"\nsave_to_sent = true').accounts["scanner"]
    assert explicit.relay == "graph" and relays_via_graph(explicit, PROVIDER)


def test_save_to_sent_false_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, 'mailbox = "graph"\nsave_to_sent = false')
    assert "accounts.scanner.save_to_sent" in str(info.value)
    assert "Sent Items" in str(info.value)


def test_graph_relay_needs_oauth2(tmp_path: Path) -> None:
    text = CONFIG.replace('auth = "oauth2"', 'password = "pw"').format(extra='relay = "graph"')
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert 'relay = "graph" needs auth = "oauth2"' in str(info.value)


def test_size_limit_is_graphs_for_graph_relayed_accounts() -> None:
    assert message_size_limit(ACCOUNT, PROVIDER, 35_000_000) == GRAPH_MAX_MESSAGE
    assert message_size_limit(ACCOUNT, PROVIDER, 1_000) == 1_000
    smtp = Account("x", "p", "x@example.com")
    assert message_size_limit(smtp, PROVIDER, 35_000_000) == 35_000_000
