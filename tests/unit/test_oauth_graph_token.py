"""The token manager's second resource, Microsoft Graph, on a MemoryReactorClock
against the test authorization server's logic in memory (strict refresh-token
rotation): Graph's scopes, one flight per account across both resources, the
rotated refresh token saved, refusals as for the mail token."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from twisted.internet.defer import ensureDeferred

from gateway.maildrop import UpstreamRejected, UpstreamUnavailable
from gateway.model import Config
from gateway.oauth.clouds import CLOUDS
from gateway.oauth.errors import OAuthUnavailable
from gateway.oauth.grants import graph_scopes
from gateway.oauth.manager import TokenManager
from gateway.oauth.store import TokenRecord
from gateway.upstream.graph import GraphTokens
from tests.harness.oauth_server import InMemoryPoster
from tests.helpers import token_manager
from tests.helpers.oauth import CLIENT_SECRET, oauth_config, seed
from tests.helpers.token_manager import fired, manager_for

# The shared fixtures, bound here so that pytest finds them for this module.
clock = token_manager.clock
server = token_manager.server
poster = token_manager.poster
key = token_manager.key
config = token_manager.config
store = token_manager.store

GRAPH_SCOPE = (
    "https://graph.microsoft.com/Mail.ReadWrite https://graph.microsoft.com/Mail.Send "
    "offline_access"
)


def release_first(poster: InMemoryPoster) -> None:
    """Answer the first held request, keep holding later ones."""
    gate, _answer = poster._held.pop(0)
    gate.callback(None)


def graph_now(manager: TokenManager, config: Config, *, force: bool = False) -> str:
    account = config.accounts["scanner"]
    return str(fired(ensureDeferred(manager.graph_token(account, force_refresh=force))))


def mail_now(manager: TokenManager, config: Config) -> str:
    return str(fired(ensureDeferred(manager.access_token(config.accounts["scanner"]))))


def test_the_manager_is_a_graph_token_source(config, clock, poster, store) -> None:
    assert isinstance(TokenManager(config, clock=clock, poster=poster, store=store), GraphTokens)


def test_graph_scopes_follow_the_providers_graph_host(config) -> None:
    provider = config.providers["idp"]
    assert " ".join(graph_scopes(provider, app_only=False)) == GRAPH_SCOPE
    assert graph_scopes(provider, app_only=True) == ("https://graph.microsoft.com/.default",)
    for cloud in CLOUDS.values():
        national = replace(provider, graph_url=f"https://{cloud.graph}/v1.0")
        assert graph_scopes(national, app_only=False)[0] == f"https://{cloud.graph}/Mail.ReadWrite"
        assert graph_scopes(national, app_only=True) == (f"https://{cloud.graph}/.default",)


def test_delegated_graph_token_from_the_same_refresh_token(
    config, clock, poster, store, server
) -> None:
    seeded = seed(store, server, clock.seconds())
    assert seeded.tokens is not None and seeded.tokens.refresh_token is not None
    manager = manager_for(config, clock, poster, store)
    graph = graph_now(manager, config)
    # One refresh, with Graph's scopes only (no mixing with the mail resource).
    assert poster.count("/token", "refresh_token") == 1
    form = poster.requests[0][1]
    assert form["scope"] == GRAPH_SCOPE and form["client_secret"] == CLIENT_SECRET
    assert server.access[graph].scope == GRAPH_SCOPE
    # The mail token is untouched and still served from memory.
    assert mail_now(manager, config) == seeded.tokens.access_token.reveal()
    # The rotated refresh token is the one saved; the old one is dead.
    saved = store.load("scanner")
    assert saved is not None and saved.tokens is not None and saved.graph_tokens is not None
    assert saved.graph_tokens.access_token.reveal() == graph
    assert saved.graph_tokens.refresh_token is None
    rotated = saved.tokens.refresh_token
    assert rotated is not None and rotated != seeded.tokens.refresh_token
    assert not server.refresh[seeded.tokens.refresh_token.reveal()].active
    assert server.refresh[rotated.reveal()].active
    assert saved.tokens.access_token == seeded.tokens.access_token
    # Cached: no second request.
    assert graph_now(manager, config) == graph
    assert len(poster.requests) == 1
    # The mail token's next refresh uses the rotated refresh token, with the
    # provider's scopes, and keeps the Graph token.
    clock.advance(3600)
    mail = mail_now(manager, config)
    assert server.access[mail].scope == "mail offline_access"
    assert poster.requests[-1][1]["scope"] == "mail offline_access"
    after = store.load("scanner")
    assert after is not None and after.state == "ok" and after.graph_tokens is not None
    manager.stopService()


def test_one_flight_per_account_across_both_resources(
    config, clock, poster, store, server
) -> None:
    seed(store, server, clock.seconds())
    # Not started: no background timer, the logins alone ask.
    manager = manager_for(config, clock, poster, store, start=False)
    account = config.accounts["scanner"]
    clock.advance(3600)  # the mail token expired; no Graph token yet
    poster.hold = True
    mails = [ensureDeferred(manager.access_token(account)) for _ in range(5)]
    graphs = [ensureDeferred(manager.graph_token(account)) for _ in range(5)]
    # One request at the token endpoint; Graph's waits for it, not beside it.
    assert poster.held == 1 and len(poster.requests) == 1
    release_first(poster)  # and hold the next one
    assert all(d.called for d in mails) and not any(d.called for d in graphs)
    # The Graph refresh then started, with the refresh token the first rotated.
    assert poster.held == 1 and len(poster.requests) == 2
    poster.release()
    assert all(d.called for d in graphs)
    assert poster.count("/token", "refresh_token") == 2
    manager.stopService()
    mail_tokens = {fired(d) for d in mails}
    graph_tokens = {fired(d) for d in graphs}
    assert len(mail_tokens) == 1 and len(graph_tokens) == 1
    (mail,), (graph,) = mail_tokens, graph_tokens
    assert server.access[mail].scope == "mail offline_access"
    assert server.access[graph].scope == GRAPH_SCOPE
    first, second = (form["refresh_token"] for _path, form in poster.requests)
    assert first != second  # strict rotation: the second used the first's answer
    saved = store.load("scanner")
    assert saved is not None and saved.tokens is not None and saved.tokens.refresh_token
    assert server.refresh[saved.tokens.refresh_token.reveal()].active


def test_graph_waits_for_the_mail_refresh(config, clock, poster, store, server) -> None:
    seed(store, server, clock.seconds())
    # Not started: no background timer, the logins alone ask.
    manager = manager_for(config, clock, poster, store, start=False)
    account = config.accounts["scanner"]
    clock.advance(3600)
    poster.hold = True
    mail = ensureDeferred(manager.access_token(account))
    graph = ensureDeferred(manager.graph_token(account))
    assert poster.held == 1 and len(poster.requests) == 1
    assert poster.requests[0][1]["scope"] == "mail offline_access"
    poster.release()
    assert mail.called and graph.called
    assert [form["scope"] for _p, form in poster.requests] == ["mail offline_access", GRAPH_SCOPE]


def test_graph_token_expired_or_forced(config, clock, poster, store, server) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    first = graph_now(manager, config)
    # A forced refresh right after a refresh reuses it (FORCED_REFRESH_MIN_AGE).
    assert graph_now(manager, config, force=True) == first
    clock.advance(60)
    forced = graph_now(manager, config, force=True)
    assert forced != first
    before = len(poster.requests)
    clock.advance(4000)
    expired = graph_now(manager, config)
    assert expired != forced and len(poster.requests) > before
    assert server.access[expired].scope == GRAPH_SCOPE
    manager.stopService()


def test_app_only_graph_token_is_graphs_default_scope(clock, poster, store, server) -> None:
    config = oauth_config(store.directory.parent, grant="client_credentials")
    manager = manager_for(config, clock, poster, store)
    token = graph_now(manager, config)
    assert poster.count("/token", "client_credentials") == 1
    form = poster.requests[0][1]
    assert form["scope"] == "https://graph.microsoft.com/.default"
    assert server.access[token].scope == "https://graph.microsoft.com/.default"
    saved = store.load("scanner")
    assert saved is not None and saved.graph_tokens is not None and saved.tokens is None
    manager.stopService()


def test_a_refused_graph_refresh_blocks_both(config, clock, poster, store, server) -> None:
    seed(store, server, clock.seconds())
    server.revoke("alice")
    manager = manager_for(config, clock, poster, store)
    with pytest.raises(UpstreamRejected) as info:
        graph_now(manager, config)
    assert "invalid_grant" in info.value.detail
    saved = store.load("scanner")
    assert saved is not None and saved.state == "needs_reauth"
    clock.advance(3600)
    with pytest.raises(UpstreamRejected):
        mail_now(manager, config)
    assert poster.count("/token", "refresh_token") == 1
    manager.stopService()


def test_a_graph_refresh_failing_for_now_is_temporary(config, clock, poster, store, server) -> None:
    seed(store, server, clock.seconds())
    manager = manager_for(config, clock, poster, store)
    poster.raise_next.append(OAuthUnavailable("connection refused"))
    with pytest.raises(UpstreamUnavailable):
        graph_now(manager, config)
    # Backing off: the next login within BACKOFF_FIRST sends nothing.
    with pytest.raises(UpstreamUnavailable):
        graph_now(manager, config)
    assert len(poster.requests) == 1
    clock.advance(6)
    assert graph_now(manager, config)
    manager.stopService()


def test_a_service_account_has_no_graph_token(clock, poster, store) -> None:
    config = oauth_config(store.directory.parent, grant="service_account")
    manager = manager_for(config, clock, poster, store)
    with pytest.raises(UpstreamRejected):
        graph_now(manager, config)
    assert poster.requests == []


def test_a_record_written_before_graph_tokens_still_loads(config, clock, store, server) -> None:
    record = seed(store, server, clock.seconds())
    document = json.loads(record.to_json())
    for name in ("graph_tokens", "graph_refresh", "error_from_login"):
        del document[name]
    old = TokenRecord.from_json(json.dumps(document).encode())
    assert old == record and old.graph_tokens is None
