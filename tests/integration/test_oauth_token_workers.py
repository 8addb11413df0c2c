"""Worker processes of one host share the embedded token store: logins racing
in two real processes with an expired token make one refresh, and the rotated
refresh token is what the store keeps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.oauth.tokens import parse_token_response
from tests.harness.oauth_server import OAuthServerProcess
from tests.helpers.device_grant import device_grant_tokens, post_form, store_for
from tests.helpers.oauth import CLIENT_SECRET
from tests.helpers.token_stores import seed_answer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
REFRESH_GRANT = "token:refresh_token"
PER_PROCESS = 15


def test_two_worker_processes_make_one_refresh(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with OAuthServerProcess(tmp_path / "idp", client_secret=CLIENT_SECRET) as idp:
        answer = device_grant_tokens(idp, CLIENT_SECRET)
        store = store_for(state)
        seed_answer(store, "scanner", answer, issued=time.time() - 7200)
        idp.control("reset_counts")
        idp.control("hold")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        workers = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.helpers.token_process",
                    str(state),
                    idp.url,
                    CLIENT_SECRET,
                    str(PER_PROCESS),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(2)
        ]
        try:
            deadline = time.monotonic() + 20
            while idp.stats()["held"] < 1:
                assert time.monotonic() < deadline, "no refresh reached the server"
                time.sleep(0.02)
            # Both processes are logging in by now; the second waits for the claim.
            time.sleep(1.0)
            assert idp.stats()["held"] == 1
            idp.control("release")
            outputs = [worker.communicate(timeout=30) for worker in workers]
        finally:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
                    worker.wait()
        reports = []
        for out, err in outputs:
            assert out.strip(), err
            reports.append(json.loads(out.strip().splitlines()[-1]))
        assert [r["errors"] for r in reports] == [[], []]
        tokens = {token for r in reports for token in r["tokens"]}
        assert len(tokens) == 1 and sum(len(r["tokens"]) for r in reports) == 2 * PER_PROCESS
        assert idp.count(REFRESH_GRANT) == 1
        assert sorted(r["refreshes"] for r in reports) == [0, 1]
        stored = store.load("scanner")
        assert stored is not None and stored.tokens is not None
        assert stored.tokens.access_token.reveal() in tokens
        rotated = stored.tokens.refresh_token
        assert rotated is not None and rotated.reveal() != answer["refresh_token"]
        # The stored (rotated) refresh token is the live one at the provider.
        refreshed = parse_token_response(_refresh(idp, rotated.reveal()), time.time())
        assert refreshed.access_token.reveal() not in tokens


def _refresh(idp: OAuthServerProcess, refresh_token: str) -> dict[str, Any]:
    return post_form(
        f"{idp.url}/token",
        {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": "gateway",
            "client_secret": CLIENT_SECRET,
        },
    )
