"""The token manager on a MemoryReactorClock, against the test authorization
server's logic in memory: caching, single-flight refresh, background and idle
refresh, rotation, invalid_grant, backoff, and the store shared with `gateway oauth`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import formatEvent, globalLogPublisher

from gateway.maildrop import UpstreamRejected, UpstreamUnavailable
from gateway.model import Config
from gateway.oauth.errors import OAuthUnavailable
from gateway.oauth.keys import GatewayKey, new_key
from gateway.oauth.manager import BACKOFF_FIRST, MAX_SLEEP, TokenManager
from gateway.oauth.store import TokenRecord, TokenStore
from tests.harness.oauth_server import AuthServer, InMemoryPoster
from tests.helpers import token_manager
from tests.helpers.oauth import CLIENT_SECRET, oauth_config, seed
from tests.helpers.token_manager import manager_for

# The shared fixtures, bound here so that pytest finds them for this module.
clock = token_manager.clock
server = token_manager.server
poster = token_manager.poster
key = token_manager.key
config = token_manager.config
store = token_manager.store


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("gateway"):
            lines.append(f"{event['log_level'].name} {formatEvent(event)}")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def token_now(manager: TokenManager, config: Config, *, force: bool = False) -> str:
    """access_token when it must complete without waiting."""
    d = ensureDeferred(manager.access_token(config.accounts["scanner"], force_refresh=force))
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "access_token is waiting"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return str(results[0])


def refreshes(poster: InMemoryPoster) -> int:
    return poster.count("/token", "refresh_token")


def secrets_of(server: AuthServer) -> list[str]:
    return [*server.access, *server.refresh, CLIENT_SECRET]


# -- the hot path ---------------------------------------------------------------------------


def test_cached_token_needs_no_request(config, clock, poster, store, server) -> None:
    seeded = seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    assert seeded.tokens is not None
    for _ in range(100):
        assert token_now(manager, config) == seeded.tokens.access_token.reveal()
    assert poster.requests == []
    manager.stopService()
    assert clock.getDelayedCalls() == []


def test_expired_token_is_refreshed_and_the_rotated_refresh_token_saved(
    config, clock, poster, store, server
) -> None:
    seeded = seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store, start=False)
    clock.advance(3600)
    token = token_now(manager, config)
    assert seeded.tokens is not None and token != seeded.tokens.access_token.reveal()
    assert refreshes(poster) == 1
    saved = store.load("scanner")
    assert saved is not None and saved.tokens is not None
    assert saved.tokens.access_token.reveal() == token
    # The server rotated the refresh token and killed the old one: the saved
    # one is the new one, or the next refresh (after a restart) would fail.
    assert saved.tokens.refresh_token != seeded.tokens.refresh_token
    assert server.refresh[saved.tokens.refresh_token.reveal()].active  # type: ignore[union-attr]
    # The refresh sent the client's credentials and scopes.
    _path, form = poster.requests[0]
    assert form["client_id"] == "gateway" and form["client_secret"] == CLIENT_SECRET
    assert form["scope"] == "mail offline_access"


def test_fifty_concurrent_logins_cause_one_refresh(config, clock, poster, store, server) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    poster.hold = True
    # The background timer starts the refresh 300 s before expiry; the
    # provider is slow, and the token expires while it is in flight.
    clock.advance(3600)
    account = config.accounts["scanner"]
    waiting = [ensureDeferred(manager.access_token(account)) for _ in range(50)]
    # A forced refresh (after an upstream 401) joins too.
    waiting.append(ensureDeferred(manager.access_token(account, force_refresh=True)))
    clock.advance(MAX_SLEEP)
    assert poster.held == 1 and not any(d.called for d in waiting)
    poster.release()
    tokens = {d.result for d in waiting}  # type: ignore[attr-defined]
    assert len(tokens) == 1
    assert refreshes(poster) == 1
    assert manager.refresh_requests("scanner") == 1
    manager.stopService()


def test_a_cancelled_login_does_not_cancel_the_shared_refresh(
    config, clock, poster, store, server
) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store, start=False)
    clock.advance(3600)
    poster.hold = True
    account = config.accounts["scanner"]
    first = ensureDeferred(manager.access_token(account))
    second = ensureDeferred(manager.access_token(account))
    first.cancel()
    first.addErrback(lambda _: None)
    poster.release()
    assert isinstance(second.result, str)  # type: ignore[attr-defined]
    assert refreshes(poster) == 1


# -- background refresh -------------------------------------------------------------------


def test_background_refresh_before_expiry(config, clock, poster, store, server) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    clock.advance(3600 - 300 - 1)
    assert refreshes(poster) == 0
    clock.advance(2)
    assert refreshes(poster) == 1
    # Logins never wait: the new token is there before the old one expires.
    clock.advance(300)
    token_now(manager, config)
    assert refreshes(poster) == 1
    # And it goes on, once per token lifetime.
    clock.advance(3600)
    assert refreshes(poster) == 2
    manager.stopService()


def test_idle_refresh_keeps_refresh_tokens_alive(clock, poster, store, server, tmp_path) -> None:
    config = oauth_config(store.directory.parent, idle=3 * 86400)
    server.access_ttl = 30 * 86400  # a long-lived access token: no expiry refresh
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    for _ in range(3 * 86400 // int(MAX_SLEEP) - 1):
        clock.advance(MAX_SLEEP)
    assert refreshes(poster) == 0
    clock.advance(2 * MAX_SLEEP)
    assert refreshes(poster) == 1
    manager.stopService()


def test_tokens_shorter_than_the_margin_do_not_loop(clock, poster, store, server) -> None:
    config = oauth_config(store.directory.parent, margin=300)
    server.access_ttl = 60
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    for _ in range(600):
        clock.advance(1)
    # Refreshed at half the lifetime: about every 30 s, not continuously.
    assert 15 <= refreshes(poster) <= 25
    token_now(manager, config)
    manager.stopService()


def test_client_credentials_renewed_by_the_same_grant(clock, poster, store, server) -> None:
    config = oauth_config(store.directory.parent, grant="client_credentials")
    seed(store, server, clock.seconds(), grant="client_credentials")
    manager = manager_for(config, clock, poster, store)
    clock.advance(3600 - 299)
    assert poster.count("/token", "client_credentials") == 1
    assert refreshes(poster) == 0
    form = poster.requests[0][1]
    assert form["scope"] == "mail/.default" and form["client_secret"] == CLIENT_SECRET
    token_now(manager, config)
    manager.stopService()


# -- failures ---------------------------------------------------------------------------------


def test_invalid_grant_marks_the_account_and_refuses_devices(
    config, clock, poster, store, server, logged
) -> None:
    seed(store, server, clock.seconds())
    server.revoke("alice")
    manager = manager_for(config, clock, poster, store)
    clock.advance(3600)
    with pytest.raises(UpstreamRejected) as info:
        token_now(manager, config)
    error = info.value
    assert error.code == "SYS/PERM"
    assert str(error) == "mailbox authorisation expired, ask the administrator"
    assert "invalid_grant" in error.detail and "gateway oauth authorize scanner" in error.detail
    saved = store.load("scanner")
    assert saved is not None and saved.state == "needs_reauth"
    assert saved.last_error is not None and saved.last_error.startswith("invalid_grant")
    assert any(line.startswith("error ") and "(invalid_grant)" in line for line in logged)
    # No second request for the same dead grant, however many logins follow.
    for _ in range(5):
        with pytest.raises(UpstreamRejected):
            token_now(manager, config)
    clock.advance(10 * MAX_SLEEP)
    assert refreshes(poster) == 1
    manager.stopService()


def test_needs_reauth_survives_a_restart(config, clock, poster, store, server) -> None:
    seed(store, server, clock.seconds())
    server.revoke("alice")
    clock.advance(3600)
    first = manager_for(config, clock, poster, store)
    with pytest.raises(UpstreamRejected):
        token_now(first, config)
    first.stopService()
    second = manager_for(config, clock, poster, store)
    with pytest.raises(UpstreamRejected, match="authorisation expired"):
        token_now(second, config)
    assert refreshes(poster) == 1
    second.stopService()


def test_a_still_valid_token_is_used_after_invalid_grant(
    config, clock, poster, store, server
) -> None:
    seeded = seed(store, server, clock.seconds())
    server.refresh.clear()  # the refresh token died, the access token has not
    manager = manager_for(config, clock, poster, store)
    clock.advance(3600 - 299)  # background refresh fails
    assert refreshes(poster) == 1
    assert seeded.tokens is not None
    assert token_now(manager, config) == seeded.tokens.access_token.reveal()
    clock.advance(299)
    with pytest.raises(UpstreamRejected):
        token_now(manager, config)
    manager.stopService()


def test_invalid_client_is_permanent_with_its_own_hint(
    config, clock, poster, store, server, logged
) -> None:
    seed(store, server, clock.seconds())
    server.client_secret = "rotated-by-the-tenant-admin"
    manager = manager_for(config, clock, poster, store)
    clock.advance(3600)
    with pytest.raises(UpstreamRejected):
        token_now(manager, config)
    saved = store.load("scanner")
    assert saved is not None and saved.state == "failed"
    assert any("invalid_client" in line and "client settings" in line for line in logged)
    manager.stopService()


@pytest.mark.parametrize("trouble", ["network", "5xx", "429"])
def test_transient_failure_keeps_serving_a_valid_token_and_backs_off(
    config, clock, poster, store, server, trouble
) -> None:
    seeded = seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)

    def break_once() -> None:
        if trouble == "network":
            poster.raise_next.append(OAuthUnavailable("connection refused"))
        else:
            server.fail_next(503 if trouble == "5xx" else 429)

    for _ in range(3):
        break_once()
    clock.advance(3600 - 300)  # due: fails
    assert refreshes(poster) == 1
    assert seeded.tokens is not None
    assert token_now(manager, config) == seeded.tokens.access_token.reveal()
    clock.advance(BACKOFF_FIRST)  # retry 1 fails
    clock.advance(2 * BACKOFF_FIRST)  # retry 2 fails
    assert refreshes(poster) == 3
    saved = store.load("scanner")
    assert saved is not None and saved.state == "ok"
    assert saved.last_error is not None and saved.last_error.startswith("temporary")
    clock.advance(4 * BACKOFF_FIRST)  # retry 3 succeeds
    assert refreshes(poster) == 4
    saved = store.load("scanner")
    assert saved is not None and saved.last_error is None
    assert token_now(manager, config) != seeded.tokens.access_token.reveal()
    manager.stopService()


def test_no_valid_token_and_provider_down_is_temporary(
    config, clock, poster, store, server
) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store, start=False)
    clock.advance(3600)
    poster.raise_next.append(OAuthUnavailable("timed out"))
    with pytest.raises(UpstreamUnavailable) as info:
        token_now(manager, config)
    assert info.value.code == "SYS/TEMP"
    # Logins during the backoff fail at once, without hammering the provider.
    for _ in range(10):
        with pytest.raises(UpstreamUnavailable):
            token_now(manager, config)
    assert refreshes(poster) == 1
    clock.advance(BACKOFF_FIRST)
    token_now(manager, config)
    assert refreshes(poster) == 2


def test_forced_refresh_once_then_reuse(config, clock, poster, store, server) -> None:
    seeded = seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store, start=False)
    clock.advance(60)
    assert seeded.tokens is not None
    fresh = token_now(manager, config, force=True)
    assert fresh != seeded.tokens.access_token.reveal() and refreshes(poster) == 1
    # A second login refused with the old token right after: no second refresh.
    assert token_now(manager, config, force=True) == fresh
    assert refreshes(poster) == 1


# -- the store, shared with `gateway oauth` -------------------------------------------------


def test_not_authorised_yet(config, clock, poster, store) -> None:
    manager = manager_for(config, clock, poster, store)
    with pytest.raises(UpstreamRejected) as info:
        token_now(manager, config)
    assert str(info.value) == "mailbox not authorised yet, ask the administrator"
    assert "gateway oauth authorize scanner" in info.value.detail
    manager.stopService()


def test_tokens_written_by_the_cli_are_picked_up_without_restart(
    config, clock, poster, store, server, key
) -> None:
    manager = manager_for(config, clock, poster, store)
    with pytest.raises(UpstreamRejected):
        token_now(manager, config)
    cli_store = TokenStore.open(config.state_dir, key)  # another process
    seeded = seed(cli_store, server, clock.seconds())
    assert seeded.tokens is not None
    assert token_now(manager, config) == seeded.tokens.access_token.reveal()
    # ...and the background timer now looks after it.
    clock.advance(3600)
    assert refreshes(poster) == 1
    manager.stopService()


def test_revocation_by_the_cli_takes_effect_at_once(
    config, clock, poster, store, server, key
) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    token_now(manager, config)
    TokenStore.open(config.state_dir, key).update(
        "scanner", lambda current: current.revoked(clock.seconds()) if current else None
    )
    with pytest.raises(UpstreamRejected, match="not authorised"):
        token_now(manager, config)
    clock.advance(2 * 3600)
    assert refreshes(poster) == 0
    manager.stopService()


def test_a_refresh_never_overwrites_a_new_authorisation(
    config, clock, poster, store, server, key
) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store, start=False)
    clock.advance(3600)
    poster.hold = True
    waiting = ensureDeferred(manager.access_token(config.accounts["scanner"]))
    # While the refresh is in flight, the admin re-authorises.
    admin = seed(TokenStore.open(config.state_dir, key), server, clock.seconds(), username="alice")
    poster.release()
    assert admin.tokens is not None
    assert waiting.result == admin.tokens.access_token.reveal()  # type: ignore[attr-defined]
    saved = store.load("scanner")
    assert saved is not None and saved.lineage == admin.lineage
    assert saved.tokens == admin.tokens


def test_unreadable_file_is_a_clear_refusal_not_a_crash(
    config, clock, poster, store, server, logged
) -> None:
    seed(store, server, clock.seconds())
    store.path_for("scanner").write_bytes(store.path_for("scanner").read_bytes()[:40])
    manager = manager_for(config, clock, poster, store)
    with pytest.raises(UpstreamRejected) as info:
        token_now(manager, config)
    assert "truncated" in info.value.detail
    assert str(info.value) == "gateway cannot use its stored authorisation, ask the administrator"
    assert any(line.startswith("error ") and "truncated" in line for line in logged)
    clock.advance(2 * 3600)
    assert poster.requests == []
    manager.stopService()


def test_wrong_key_is_reported_per_account(config, clock, poster, store, server) -> None:
    seed(store, server, clock.seconds())
    wrong = TokenStore.open(config.state_dir, GatewayKey(new_key(), "$GATEWAY_KEY"))
    manager = manager_for(config, clock, poster, wrong)
    with pytest.raises(UpstreamRejected) as info:
        token_now(manager, config)
    assert "different gateway key" in info.value.detail
    manager.stopService()


def test_unusable_key_file_fails_oauth_logins_cleanly(config, clock, poster, logged) -> None:
    config.state_dir.mkdir(parents=True)
    key_file = config.state_dir / "gateway.key"
    key_file.write_text("x" * 44)
    key_file.chmod(0o644)
    manager = TokenManager(config, clock=clock, poster=poster, environ={})
    manager.startService()
    with pytest.raises(UpstreamRejected) as info:
        token_now(manager, config)
    assert "must be 0600" in info.value.detail
    assert any(line.startswith("error ") and "token store unusable" in line for line in logged)
    manager.stopService()


def test_key_generated_by_the_manager_when_started(config, clock, poster) -> None:
    manager = TokenManager(config, clock=clock, poster=poster, environ={})
    manager.startService()
    assert (config.state_dir / "gateway.key").exists()
    assert manager.store is not None
    manager.stopService()


def test_no_secret_in_any_log_line(config, clock, poster, store, server, logged) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    clock.advance(3600)  # refresh
    poster.raise_next.append(OAuthUnavailable("down"))
    clock.advance(3600)  # transient failure
    clock.advance(BACKOFF_FIRST)
    server.revoke("alice")
    clock.advance(3600)  # invalid_grant
    with pytest.raises(UpstreamRejected) as info:
        token_now(manager, config)
    manager.stopService()
    text = "\n".join(logged) + info.value.detail
    assert "refreshed" in text and "invalid_grant" in text and "retrying" in text
    for secret in secrets_of(server):
        assert secret not in text


def test_account_without_oauth_client(tmp_path, clock, poster) -> None:
    from dataclasses import replace

    config = oauth_config(tmp_path / "state")
    config = replace(config, providers={"idp": replace(config.providers["idp"], oauth=None)})
    manager = TokenManager(config, clock=clock, poster=poster, environ={})
    with pytest.raises(UpstreamRejected) as info:
        token_now(manager, config)
    assert "no OAuth2 client" in info.value.detail


def test_password_account_is_not_served(config, clock, poster, store) -> None:
    from gateway.model import Account

    manager = manager_for(config, clock, poster, store)
    other = Account(name="other", provider="idp", username="bob")
    d: Deferred[str] = ensureDeferred(manager.access_token(other))
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(UpstreamRejected)
    manager.stopService()


def test_record_round_trip_keeps_state_fields(config, clock, store, server) -> None:
    seeded = seed(store, server, clock.seconds())
    failed = seeded.failed("needs_reauth", "invalid_grant: gone", clock.seconds())
    store.update("scanner", lambda _: failed)
    assert store.load("scanner") == failed
    assert isinstance(failed, TokenRecord)


def test_forced_refresh_right_after_an_admin_authorisation(
    config, clock, poster, store, server
) -> None:
    """A token the admin stored seconds ago may be the very one the provider refused."""
    seeded = seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store, start=False)
    assert seeded.tokens is not None
    assert token_now(manager, config) == seeded.tokens.access_token.reveal()
    assert token_now(manager, config, force=True) != seeded.tokens.access_token.reveal()
    assert refreshes(poster) == 1


def test_forced_refresh_after_a_new_authorisation_following_a_refresh(
    config, clock, poster, store, server, key
) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store, start=False)
    token_now(manager, config, force=True)  # a refresh here
    again = seed(TokenStore.open(config.state_dir, key), server, clock.seconds())
    assert again.tokens is not None
    assert token_now(manager, config, force=True) != again.tokens.access_token.reveal()
    assert refreshes(poster) == 2


def test_an_unexpected_error_is_a_temporary_failure(
    config, clock, poster, store, server, logged
) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    clock.advance(3600)  # the background refresh runs
    clock.advance(20)
    poster.raise_next.append(RuntimeError("a bug"))
    with pytest.raises(UpstreamUnavailable):
        token_now(manager, config, force=True)
    assert any("unexpected error while refreshing" in line for line in logged)
    clock.advance(BACKOFF_FIRST)  # the timer still runs and retries
    token_now(manager, config)
    manager.stopService()


# -- what the metrics read ---------------------------------------------------------------


def test_statuses_for_the_metrics(config, clock, poster, store, server) -> None:
    manager = manager_for(config, clock, poster, store)
    [status] = manager.statuses()
    assert (status.account, status.state, status.expires_at) == ("scanner", "unauthorised", None)
    seeded = seed(store, server, clock.seconds())
    clock.advance(MAX_SLEEP)  # the timer reads the store
    [status] = manager.statuses()
    assert seeded.tokens is not None
    assert (status.state, status.expires_at) == ("ok", seeded.tokens.expires_at)
    poster.raise_next.append(OAuthUnavailable("connection refused"))
    clock.advance(3600)  # due: fails once, then the retry succeeds
    clock.advance(BACKOFF_FIRST)
    [status] = manager.statuses()
    assert status.refresh_outcomes == {"failed": 1, "ok": 1}
    assert status.expires_at is not None and status.expires_at > clock.seconds()
    server.revoke("alice")
    clock.advance(3600)
    [status] = manager.statuses()
    assert status.state == "needs_reauth"
    assert status.refresh_outcomes == {"failed": 1, "ok": 1, "refused": 1}
    assert manager.store_problem is None
    manager.stopService()


def test_an_unusable_store_is_a_readiness_problem(config, clock, poster) -> None:
    config.state_dir.mkdir(parents=True)
    key_file = config.state_dir / "gateway.key"
    key_file.write_text("x" * 44)
    key_file.chmod(0o644)
    manager = TokenManager(config, clock=clock, poster=poster, environ={})
    manager.startService()
    assert manager.store_problem is not None and "must be 0600" in manager.store_problem
    assert [s.state for s in manager.statuses()] == ["unusable"]
    manager.stopService()
