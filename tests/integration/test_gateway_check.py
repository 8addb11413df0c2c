"""`gateway check` as a child process against a real Dovecot (POP3S, IMAPS and its
submission service with STARTTLS, relaying to a sink) whose oauth2 passdb
introspects tokens at the suite's authorization server: healthy password and OAuth2
accounts, a wrong password, a refused token, an unreachable host and a certificate
from another CA, each with the failing step named in text and in JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.certs import TLSMaterial, make_tls_material
from tests.harness.dovecot import Dovecot
from tests.harness.gateway_config import provider
from tests.harness.gateway_process import REPO_ROOT, free_port
from tests.harness.oauth_server import OAuthServerProcess
from tests.harness.smtp_sink import SMTPSink
from tests.helpers.device_grant import store_device_grant
from tests.helpers.pop3 import message

pytestmark = pytest.mark.integration

CLIENT_SECRET = "check-client-secret"
USERS = {"alice": "alice-pw", "bob": "bob-pw"}


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OAuthServerProcess]:
    with OAuthServerProcess(
        tmp_path_factory.mktemp("idp-check"), client_secret=CLIENT_SECRET
    ) as server:
        yield server


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SMTPSink]:
    with SMTPSink(tmp_path_factory.mktemp("sink-check")) as server:
        yield server


@pytest.fixture(scope="module")
def upstream(
    tmp_path_factory: pytest.TempPathFactory,
    tls_upstream: TLSMaterial,
    idp: OAuthServerProcess,
    sink: SMTPSink,
) -> Iterator[Dovecot]:
    with Dovecot(
        tmp_path_factory.mktemp("dovecot-check"),
        USERS,
        tls=tls_upstream,
        oauth2_introspection_url=f"{idp.url}/introspect",
        submission_relay_port=sink.port,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: Dovecot,
    tls_upstream: TLSMaterial,
    idp: OAuthServerProcess,
) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("check")
    stranger = make_tls_material(base / "stranger")
    secret = base / "client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    secret.chmod(0o600)
    oauth = (
        f'oauth = {{ token_url = "{idp.url}/token", '
        f'device_authorization_url = "{idp.url}/device", client_id = "gateway", '
        f'client_secret_file = "{secret}", scopes = ["mail", "offline_access"] }}'
    )
    assert upstream.submission_port is not None
    lines = [
        f'state_dir = "{base / "state"}"',
        "[providers.dovecot]",
        f'pop3 = {{ host = "localhost", port = {upstream.pop3s_port}, tls = "implicit" }}',
        f'imap = {{ host = "localhost", port = {upstream.imaps_port}, tls = "implicit" }}',
        f'smtp = {{ host = "localhost", port = {upstream.submission_port}, tls = "starttls" }}',
        f'ca_file = "{tls_upstream.ca_file}"',
        "timeout = 5",
        oauth,
        'sasl = "xoauth2"',
        *provider(
            "closed",
            "pop3",
            free_port(),
            "implicit",
            tls_upstream.ca_file,
            timeout=5,
            host="127.0.0.1",
        ),
        *provider("stranger", "pop3", upstream.pop3s_port, "implicit", stranger.ca_file, timeout=5),
        "[accounts.pop]",
        'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"',
        "[accounts.imap]",
        'provider = "dovecot"\nusername = "alice"\npassword = "alice-pw"\nmailbox = "imap"',
        "[accounts.wrong]",
        'provider = "dovecot"\nusername = "bob"\npassword = "not-bobs"',
        "[accounts.token]",
        'provider = "dovecot"\nusername = "alice"\nauth = "oauth2"\ngrant = "device_code"',
        "[accounts.down]",
        'provider = "closed"\nusername = "alice"\npassword = "alice-pw"',
        "[accounts.mitm]",
        'provider = "stranger"\nusername = "alice"\npassword = "alice-pw"',
    ]
    config = base / "gateway.toml"
    config.write_text("\n".join(lines) + "\n")
    return {"config": config, "state": base / "state"}


def gateway_check(setup: dict[str, Any], *args: str) -> tuple[int, str, str]:
    process = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "--config", str(setup["config"]), "check", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    return process.returncode, process.stdout, process.stderr


def check_json(setup: dict[str, Any], account: str) -> tuple[int, dict[str, Any]]:
    status, out, err = gateway_check(setup, account, "--json")
    document = json.loads(out)
    assert document["config"] == str(setup["config"])
    (result,) = document["accounts"]
    assert document["ok"] is result["ok"] is (status == 0), err
    return status, result


def steps(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        (s["step"] if s["protocol"] == "oauth" else f"{s['protocol']} {s['step']}"): s
        for s in result["steps"]
    }


def outcomes(result: dict[str, Any]) -> dict[str, str]:
    return {name: step["outcome"] for name, step in steps(result).items()}


def authorize(state: Path, idp: OAuthServerProcess, account: str, username: str) -> None:
    """Tokens from a completed device grant, stored as `gateway oauth authorize` does."""
    store_device_grant(state, idp, account, CLIENT_SECRET, username)


# -- healthy accounts -------------------------------------------------------------------


def test_healthy_pop3_account_with_smtp(setup: dict[str, Any], upstream: Dovecot) -> None:
    upstream.clear("alice")
    upstream.deliver("alice", message(1))
    status, out, err = gateway_check(setup, "pop")
    assert status == 0, out + err
    lines = out.splitlines()
    assert lines[0] == "account pop (alice at provider dovecot, password)"
    for step in ("pop3 connect", "pop3 tls", "pop3 login", "pop3 maildrop", "smtp login"):
        assert any(line.split()[:3] == ["ok", *step.split()] for line in lines), (step, out)
    assert "STAT: 1 messages" in out
    assert "fix:" not in out
    assert lines[-1] == "account pop: ok"
    # Nothing was changed or sent.
    assert len(upstream.messages("alice")) == 1

    status, result = check_json(setup, "pop")
    assert status == 0 and result["failed_step"] is None
    assert outcomes(result) == {
        "token": "skipped",
        "pop3 connect": "ok",
        "pop3 tls": "ok",
        "pop3 login": "ok",
        "pop3 maildrop": "ok",
        "smtp connect": "ok",
        "smtp tls": "ok",
        "smtp login": "ok",
        "smtp quit": "ok",
    }


def test_healthy_imap_account(setup: dict[str, Any], upstream: Dovecot) -> None:
    upstream.clear("alice")
    upstream.deliver("alice", message(1))
    upstream.deliver("alice", message(2))
    status, result = check_json(setup, "imap")
    assert status == 0, result
    assert outcomes(result)["imap maildrop"] == "ok"
    assert "pop3 login" not in outcomes(result)
    assert "EXAMINE 'INBOX' (read-only): 2 messages" in steps(result)["imap maildrop"]["detail"]


def test_healthy_oauth_account_then_a_refused_token(
    setup: dict[str, Any], idp: OAuthServerProcess
) -> None:
    authorize(setup["state"], idp, "token", "alice")
    status, result = check_json(setup, "token")
    assert status == 0, result
    assert outcomes(result)["token"] == "ok"
    assert outcomes(result)["pop3 login"] == "ok" and outcomes(result)["smtp login"] == "ok"
    assert "bearer token" in steps(result)["pop3 login"]["detail"]

    # The provider withdraws the grant: the cached token looks valid to the
    # gateway, the server refuses it, and the one forced refresh is refused too.
    idp.control("revoke", username="alice")
    status, out, _err = gateway_check(setup, "token")
    assert status == 1
    assert out.splitlines()[-1] == "account token: FAILED at pop3 login, smtp login"
    assert any(line.split()[:2] == ["ok", "token"] for line in out.splitlines())
    status, result = check_json(setup, "token")
    assert status == 1 and result["failed_step"] == "pop3 login"
    login = steps(result)["pop3 login"]
    assert "re-authorisation" in login["detail"]
    assert "gateway oauth authorize token" in login["fix"]
    assert outcomes(result)["pop3 maildrop"] == "skipped"


# -- failures, each at its step --------------------------------------------------------------


def test_wrong_password(setup: dict[str, Any]) -> None:
    status, out, _err = gateway_check(setup, "wrong")
    assert status == 1
    lines = out.splitlines()
    failed = next(n for n, line in enumerate(lines) if line.startswith("  FAILED"))
    assert lines[failed].split()[1:3] == ["pop3", "login"]
    assert "fix: the server refused the account's user name or password" in lines[failed + 1]
    status, result = check_json(setup, "wrong")
    assert result["failed_step"] == "pop3 login"
    login = steps(result)["pop3 login"]
    assert login["kind"] == "misconfigured" and login["code"] == "-ERR [AUTH]"
    assert outcomes(result)["pop3 maildrop"] == "skipped"
    assert steps(result)["smtp login"]["outcome"] == "failed"
    assert steps(result)["smtp login"]["code"].startswith("535")


def test_unreachable_host(setup: dict[str, Any]) -> None:
    status, out, _err = gateway_check(setup, "down")
    assert status == 1
    assert "FAILED  pop3 connect" in out and "fix: check the host and port" in out
    status, result = check_json(setup, "down")
    assert result["failed_step"] == "pop3 connect"
    assert outcomes(result) == {
        "token": "skipped",
        "pop3 connect": "failed",
        "pop3 tls": "skipped",
        "pop3 login": "skipped",
        "pop3 maildrop": "skipped",
    }


def test_certificate_from_another_ca(setup: dict[str, Any]) -> None:
    status, out, _err = gateway_check(setup, "mitm")
    assert status == 1
    assert "FAILED  pop3 tls" in out and "ca_file" in out
    status, result = check_json(setup, "mitm")
    assert result["failed_step"] == "pop3 tls"
    assert outcomes(result)["pop3 connect"] == "ok"
    assert outcomes(result)["pop3 login"] == "skipped"
    assert "TLS" in steps(result)["pop3 tls"]["detail"]


def test_all_accounts_and_usage(setup: dict[str, Any]) -> None:
    status, out, _err = gateway_check(setup, "--all", "--json")
    document = json.loads(out)
    assert status == 1 and document["ok"] is False
    assert [a["account"] for a in document["accounts"]] == sorted(
        ["pop", "imap", "wrong", "token", "down", "mitm"]
    )
    status, _out, err = gateway_check(setup)
    assert status == 1 and "name one or more accounts, or give --all" in err
    status, _out, err = gateway_check(setup, "nobody")
    assert status == 1 and "no account 'nobody'" in err
