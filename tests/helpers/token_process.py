"""One gateway process's token manager, as a child process: `N` concurrent
logins of account "scanner", then one JSON line on stdout with the access
tokens they got (or their errors) and the refresh requests this process sent.

    python -m tests.helpers.token_process STATE_DIR TOKEN_SERVER_URL SECRET N

The store is the embedded one under STATE_DIR (key in the directory), so two
of these on one directory are two worker processes of one host.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import react

from gateway.oauth.http import TreqPoster
from gateway.oauth.manager import TokenManager
from tests.helpers.oauth import oauth_config


async def _logins(_reactor: Any, state: str, url: str, secret: str, count: int) -> None:
    config = oauth_config(Path(state), url, secret=secret)
    manager = TokenManager(config, clock=reactor, poster=TreqPoster(reactor), environ={})
    account = config.accounts["scanner"]
    results = await DeferredList(
        [ensureDeferred(manager.access_token(account)) for _ in range(count)],
        consumeErrors=True,
    )
    print(
        json.dumps(
            {
                "tokens": [value for ok, value in results if ok],
                "errors": [value.getErrorMessage() for ok, value in results if not ok],
                "refreshes": manager.refresh_requests("scanner"),
            }
        ),
        flush=True,
    )


def main(argv: list[str]) -> None:
    state, url, secret, count = argv
    react(lambda r: ensureDeferred(_logins(r, state, url, secret, int(count))))


if __name__ == "__main__":
    main(sys.argv[1:])
