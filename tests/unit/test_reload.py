"""Live reload (gateway.reload): what a reload says changed, a broken file kept
out, settings that need a restart kept at their running values, and the
device authenticator's cache of successful logins forgetting changed and
removed devices."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactor
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from zope.interface import provider

from gateway.config import ConfigError, Problem, load_config
from gateway.devices import AuthFailed, DeviceAuthenticator
from gateway.holder import ConfigHolder
from gateway.model import (
    Account,
    Config,
    Device,
    Endpoint,
    Listener,
    POP3Settings,
    Provider,
    ProxySettings,
    Secret,
    SMTPSettings,
)
from gateway.reload import ConfigChanges, Reloader, ReloadOnHangup
from gateway.runtime import Runtime
from gateway.service import make_service
from tests.helpers.oauth import oauth_config
from tests.unit.test_service import write_config

HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
HASHES = {pw: HASHER.hash(pw) for pw in ("printer-pw", "copier-pw", "new-pw", "scanner-pw")}


def device(name: str, password: str, account: str = "scanner") -> Device:
    return Device(name, Secret(HASHES[password]), account)


def base_config(tmp_path: Path) -> Config:
    return Config(
        state_dir=tmp_path / "state",
        tls=None,
        pop3=POP3Settings(listeners=(Listener("pop3", 9950, "implicit"),)),
        smtp=SMTPSettings(listeners=(Listener("smtp", 5870, "starttls"),)),
        providers={"corp": Provider("corp", pop3=Endpoint("pop.example.com", 995))},
        accounts={"scanner": Account("scanner", "corp", "scanner", password=Secret("up"))},
        devices={
            "printer": device("printer", "printer-pw"),
            "copier": device("copier", "copier-pw"),
            "old-printer": device("old-printer", "printer-pw"),
        },
        source=tmp_path / "gateway.toml",
    )


@pytest.fixture
def logged() -> Iterator[list[str]]:
    lines: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("gateway"):
            lines.append(f"{event['log_level'].name} {formatEvent(event)}")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


class Counted:
    """Runs the argon2 check inline and counts it: a login answered from the
    cache costs no check."""

    def __init__(self) -> None:
        self.checks = 0

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        self.checks += 1
        return succeed(f(*args))


def login(auth: DeviceAuthenticator, name: str, password: str) -> Device | str:
    """The device, or the refusal's reason; the inline checks finish at once."""
    results: list[Any] = []
    d = Deferred.fromCoroutine(auth.authenticate(name, password.encode(), "192.0.2.7", "pop3"))
    d.addBoth(results.append)
    assert results, "authenticate is waiting"
    outcome = results[0]
    if isinstance(outcome, Device):
        return outcome
    assert outcome.check(AuthFailed)
    return str(outcome.value.reason)


def runtime_for(config: Config, counted: Counted | None = None) -> Runtime:
    return Runtime(
        config=config,
        reactor=MemoryReactor(),
        identity=None,
        authenticator=DeviceAuthenticator(config.devices, run_in_thread=counted or Counted()),
    )


class Files:
    """A `load` for the reloader: answers the configs (or errors) it is given, in turn."""

    def __init__(self, *answers: Config | ConfigError) -> None:
        self.answers = list(answers)

    def __call__(self, path: Path) -> Config:
        answer = self.answers.pop(0)
        if isinstance(answer, ConfigError):
            raise answer
        return answer


# -- what changed ---------------------------------------------------------------------


def test_changes_are_described_per_section(tmp_path: Path) -> None:
    old = base_config(tmp_path)
    new = dataclasses.replace(
        old,
        devices={
            "printer": old.devices["printer"],
            "copier": device("copier", "new-pw"),
            "printer-4": device("printer-4", "printer-pw"),
        },
        accounts={"scanner": dataclasses.replace(old.accounts["scanner"], username="scan2")},
    )
    changes = ConfigChanges.between(old, new)
    assert changes.describe() == (
        "devices +printer-4 -old-printer ~copier; accounts ~scanner; providers unchanged"
    )
    assert changes.needs_restart == ()


def test_settings_changed_are_named_and_restart_only_ones_set_apart(tmp_path: Path) -> None:
    old = base_config(tmp_path)
    new = dataclasses.replace(
        old,
        state_dir=tmp_path / "elsewhere",
        pop3=POP3Settings(listeners=(Listener("pop3", 9951, "implicit"),), idle_timeout=900.0),
    )
    changes = ConfigChanges.between(old, new)
    assert changes.describe().endswith("providers unchanged; settings ~pop3.idle_timeout")
    assert changes.needs_restart == ("state_dir", "pop3.listen")


# -- the reloader ---------------------------------------------------------------------


def test_reload_replaces_the_config_and_logs_what_changed(
    tmp_path: Path, logged: list[str]
) -> None:
    old = base_config(tmp_path)
    new = dataclasses.replace(old, devices={"printer": old.devices["printer"]})
    runtime = runtime_for(old)
    seen: list[Config] = []
    runtime.holder.on_reload(seen.append)
    devices_view = runtime.holder.devices
    assert "copier" in devices_view

    changes = Reloader(runtime, load=Files(new)).reload()

    assert changes is not None
    assert runtime.config.devices == new.devices
    assert seen == [runtime.config]
    assert "copier" not in devices_view and list(devices_view) == ["printer"]
    assert f"info config reloaded from {old.source}: devices -copier -old-printer; " in "\n".join(
        logged
    )


def test_a_file_with_problems_is_refused_whole_and_every_problem_logged(
    tmp_path: Path, logged: list[str]
) -> None:
    old = base_config(tmp_path)
    assert old.source is not None
    refused = ConfigError(
        old.source,
        [
            Problem("devices.printer.account", 'unknown account "nobody"'),
            Problem("pop3.idle_timeout", "must be a number"),
        ],
    )
    runtime = runtime_for(old)
    seen: list[Config] = []
    runtime.holder.on_reload(seen.append)

    assert Reloader(runtime, load=Files(refused)).reload() is None

    assert runtime.config is old and seen == []
    errors = [line for line in logged if line.startswith("error config reload")]
    assert errors == [
        f"error config reload from {old.source} refused, the running config stays: 2 problems",
        f'error config reload from {old.source}: devices.printer.account: unknown account "nobody"',
        f"error config reload from {old.source}: pop3.idle_timeout: must be a number",
    ]
    assert not any("config reloaded" in line for line in logged)


def test_a_real_broken_file_is_refused(tmp_path: Path, logged: list[str]) -> None:
    path = write_config(tmp_path)
    runtime = runtime_for(load_config(path))
    before = runtime.config
    path.write_text(path.read_text().replace('account = "scanner"', 'account = "nobody"'))
    assert Reloader(runtime).reload() is None
    assert runtime.config is before
    assert any("devices.printer.account" in line for line in logged if line.startswith("error"))


def test_restart_only_settings_keep_their_running_values(tmp_path: Path, logged: list[str]) -> None:
    old = base_config(tmp_path)
    new = dataclasses.replace(
        old,
        state_dir=tmp_path / "elsewhere",
        pop3=POP3Settings(listeners=(), idle_timeout=900.0),
        smtp=SMTPSettings(listeners=(Listener("smtp", 25, "starttls"),)),
        proxy=ProxySettings(trusted=(ipaddress.ip_network("10.0.0.5/32"),)),
    )
    runtime = runtime_for(old)
    Reloader(runtime, load=Files(new)).reload()
    current = runtime.config
    assert current.state_dir == old.state_dir
    assert current.pop3.listeners == old.pop3.listeners
    assert current.smtp.listeners == old.smtp.listeners
    assert current.proxy == old.proxy
    assert current.pop3.idle_timeout == 900.0  # applied
    restart = [line for line in logged if "needs a restart" in line]
    assert [line.split(": ", 1)[1] for line in restart] == [
        f"{key} changed and needs a restart; the running value stays until then"
        for key in ("state_dir", "pop3.listen", "smtp.listen", "proxy.trusted")
    ]
    assert all(line.startswith("warn") for line in restart)


def test_a_failing_subscriber_does_not_keep_others_on_the_old_config(
    tmp_path: Path, logged: list[str]
) -> None:
    old = base_config(tmp_path)
    new = dataclasses.replace(old, devices={})
    holder = ConfigHolder(old)
    seen: list[Config] = []

    def broken(config: Config) -> None:
        raise RuntimeError("bug")

    holder.on_reload(broken)
    holder.on_reload(seen.append)
    holder.replace(new)
    assert seen == [new] and holder.current is new
    assert any("failed to take the new config" in line for line in logged)


def test_the_hangup_service_reloads_the_file_of_a_built_gateway(
    tmp_path: Path, logged: list[str]
) -> None:
    path = write_config(tmp_path)
    top = make_service(load_config(path), MemoryReactor())
    hangup = next(service for service in top if isinstance(service, ReloadOnHangup))
    pop3_factory = top.getServiceNamed("pop3-implicit-0.0.0.0-9950").factory.wrappedFactory
    smtp_factory = top.getServiceNamed("smtp-starttls-0.0.0.0-5870").factory
    assert smtp_factory.network_devices.find("10.9.1.1") is None
    text = path.read_text()
    text = text.replace("port = 9950", "port = 9951")
    text += (
        f'\n[devices.copier]\npassword_hash = "{HASHES["copier-pw"]}"\naccount = "scanner"\n'
        'allow_from = ["10.9.0.0/16"]\nrelay_without_auth = true\n'
    )
    text = text.replace(
        "[accounts.scanner]",
        "[pop3]\nidle_timeout = 900\n[smtp]\nmax_recipients = 5\n\n[accounts.scanner]",
    )
    path.write_text(text)
    hangup.reload()
    assert not any(line.startswith("critical") for line in logged)
    assert not any("failed to take the new config" in line for line in logged)
    assert any(
        line.startswith("warn") and "pop3.listen changed and needs a restart" in line
        for line in logged
    )
    assert (
        f"info config reloaded from {path}: devices +copier; accounts unchanged; "
        "providers unchanged; settings ~pop3.idle_timeout ~smtp.max_recipients"
    ) in logged
    # What the listeners' factories hand to new sessions.
    assert smtp_factory.network_devices.find("10.9.1.1").name == "copier"
    assert smtp_factory.max_recipients == 5
    assert pop3_factory.idle_timeout == 900


def test_a_first_oauth2_account_starts_a_token_manager(tmp_path: Path) -> None:
    old = base_config(tmp_path)
    with_oauth = oauth_config(old.state_dir)
    new = dataclasses.replace(
        old,
        providers={**old.providers, **with_oauth.providers},
        accounts={**old.accounts, **with_oauth.accounts},
    )
    runtime = runtime_for(old)
    made: list[Config] = []

    def make_tokens(config: Config) -> Any:
        from gateway.oauth.manager import TokenManager

        made.append(config)
        return TokenManager(config, clock=runtime.reactor)

    Reloader(runtime, make_tokens=make_tokens, load=Files(new)).reload()
    assert runtime.tokens is not None and made == [runtime.config]


# -- the authenticator's cache ------------------------------------------------------------


def test_a_changed_password_is_not_answered_from_the_cache(tmp_path: Path) -> None:
    old = base_config(tmp_path)
    counted = Counted()
    runtime = runtime_for(old, counted)
    auth = runtime.authenticator
    assert isinstance(login(auth, "copier", "copier-pw"), Device)
    assert isinstance(login(auth, "copier", "copier-pw"), Device)
    assert counted.checks == 1  # the second login came from the cache

    new = dataclasses.replace(old, devices={**old.devices, "copier": device("copier", "new-pw")})
    Reloader(runtime, load=Files(new)).reload()

    assert login(auth, "copier", "copier-pw") == "wrong password"
    assert counted.checks == 2
    assert isinstance(login(auth, "copier", "new-pw"), Device)
    assert isinstance(login(auth, "copier", "new-pw"), Device)
    assert counted.checks == 3


def test_a_removed_device_is_not_answered_from_the_cache(tmp_path: Path) -> None:
    old = base_config(tmp_path)
    counted = Counted()
    runtime = runtime_for(old, counted)
    auth = runtime.authenticator
    for name in ("printer", "old-printer"):
        assert isinstance(login(auth, name, "printer-pw"), Device)
    new = dataclasses.replace(
        old, devices={n: d for n, d in old.devices.items() if n != "old-printer"}
    )
    Reloader(runtime, load=Files(new)).reload()

    assert login(auth, "old-printer", "printer-pw") == "unknown device"
    checks = counted.checks
    # A device the reload left alone still logs in from the cache.
    assert isinstance(login(auth, "printer", "printer-pw"), Device)
    assert counted.checks == checks


def test_reconfigure_forgets_only_changed_and_removed_devices(tmp_path: Path) -> None:
    old = base_config(tmp_path)
    counted = Counted()
    auth = DeviceAuthenticator(old.devices, run_in_thread=counted)
    for name, pw in (("printer", "printer-pw"), ("copier", "copier-pw")):
        login(auth, name, pw)
    auth.reconfigure({"printer": old.devices["printer"]})
    assert login(auth, "copier", "copier-pw") == "unknown device"
    checks = counted.checks
    login(auth, "printer", "printer-pw")
    assert counted.checks == checks


def test_a_device_reconfigured_during_its_password_check_is_refused(tmp_path: Path) -> None:
    old = base_config(tmp_path)
    pending: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def later(f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        pending.append((d, f, args))
        return d

    auth = DeviceAuthenticator(old.devices, run_in_thread=later)
    results: list[Any] = []
    for name, pw in (("printer", "printer-pw"), ("copier", "copier-pw")):
        d = Deferred.fromCoroutine(auth.authenticate(name, pw.encode(), "192.0.2.7", "pop3"))
        d.addBoth(results.append)
    # Both checks are running when the reload lands: copier removed, printer kept.
    auth.reconfigure({"printer": old.devices["printer"]})
    for d, f, args in pending:
        d.callback(f(*args))
    assert isinstance(results[0], Device)
    assert results[1].check(AuthFailed)
    assert results[1].value.reason == "device reconfigured during login"


def test_an_smtp_session_whose_account_was_removed_gets_a_temporary_refusal(
    tmp_path: Path,
) -> None:
    from tests.unit.test_smtp_server import Gateway

    gw = Gateway(tmp_path)
    client = gw.connect()
    client.login()
    accounts = gw.factory.accounts
    assert isinstance(accounts, dict)
    del accounts["scanner"]  # what a reload does to the live mapping
    assert client.send(b"MAIL FROM:<dev@scan.example.com>") == (
        b"451 4.3.0 configuration changed, try again later\r\n"
    )
    assert not client.closed


# -- the relay and the token manager after a reload ------------------------------------------


def test_a_removed_account_keeps_its_messages_queued_until_it_is_back(
    tmp_path: Path, logged: list[str]
) -> None:
    from tests.unit.test_smtp_relay import Harness

    h = Harness(tmp_path)
    h.upstream.script.down = True
    entry = h.queue()
    h.start()
    assert entry.state.attempts == 1  # backing off: a retry is scheduled
    accounts = h.relay.accounts
    assert isinstance(accounts, dict)
    account = accounts.pop("scanner")  # what a reload does to the live mapping
    h.relay.accounts_changed(removed=["scanner"], added=[])
    assert any("no longer configured; they stay queued" in line for line in logged)
    h.upstream.script.down = False
    h.advance(3600)
    assert entry.state.attempts == 1 and h.upstream.connections == 0
    assert entry.id in h.spool.entries
    assert len(h.clock.getDelayedCalls()) <= 1  # the control poller; no busy retry loop

    accounts["scanner"] = account
    h.relay.accounts_changed(removed=[], added=["scanner"])
    h.settle()
    assert len(h.upstream.arrived) == 1 and h.spool.entries == {}
    h.stop()


def test_the_token_manager_follows_added_removed_and_changed_accounts(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    from gateway.maildrop import UpstreamRejected
    from gateway.oauth.manager import TokenManager

    config = oauth_config(tmp_path / "state", accounts=("scanner", "copier"))
    manager = TokenManager(config, clock=Clock(), environ={})

    def refusal(account: Account) -> str:
        results: list[Any] = []
        Deferred.fromCoroutine(manager.access_token(account)).addBoth(results.append)
        assert results and results[0].check(UpstreamRejected)
        return str(results[0].value.detail)

    copier = config.accounts["copier"]
    assert "not an OAuth2 account" not in refusal(copier)
    added = dataclasses.replace(copier, name="fax")
    manager.reconfigure(
        dataclasses.replace(config, accounts={"scanner": config.accounts["scanner"], "fax": added})
    )
    assert "not an OAuth2 account" in refusal(copier)
    assert "not an OAuth2 account" not in refusal(added)
    # A provider that lost its OAuth2 client: the account's state is rebuilt from it.
    provider = dataclasses.replace(config.providers["idp"], oauth=None)
    manager.reconfigure(dataclasses.replace(config, providers={"idp": provider}))
    assert refusal(config.accounts["scanner"]) == (
        "account scanner: provider idp has no OAuth2 client configured"
    )
