"""The device authorization grant (RFC 8628): the default for a headless gateway.

The admin runs `gateway oauth authorize ACCOUNT` on the server, opens the
printed URL on any machine with a browser, types the code and signs in as
the mailbox; meanwhile this loop polls the token endpoint at the pace the
server asks for. Polling waits on the injected clock, so tests drive the
whole grant, `slow_down` and expiry included, without sleeping.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from gateway.oauth.endpoint import DeviceAuthorization, TokenEndpoint
from gateway.oauth.errors import AuthorizationFailed, OAuthEndpointError, OAuthUnavailable
from gateway.oauth.tokens import Tokens

# RFC 8628 3.5: "slow_down" means add 5 seconds to the interval for good.
SLOW_DOWN_STEP = 5.0
# Network trouble while polling: back off, but keep trying until the code expires.
MAX_NETWORK_INTERVAL = 60.0


async def run_device_flow(
    endpoint: TokenEndpoint,
    clock: IReactorTime,
    show: Callable[[DeviceAuthorization], None],
    note: Callable[[str], None] = lambda _text: None,
) -> Tokens:
    """Obtain tokens with the device grant; `show` tells the admin what to do.

    Raises `AuthorizationFailed` (declined, expired, refused) or the
    `OAuthError` of a failed first request.
    """
    authorization = await endpoint.start_device_authorization()
    show(authorization)
    interval = max(authorization.interval, 1.0)
    network_interval = interval
    while True:
        wait = network_interval if network_interval > interval else interval
        if clock.seconds() + wait > authorization.expires_at:
            await deferLater(clock, max(0.0, authorization.expires_at - clock.seconds()))
            raise AuthorizationFailed(
                "the code expired before anyone signed in; run the command again"
            )
        await deferLater(clock, wait)
        try:
            tokens = await endpoint.poll_device(authorization.device_code)
        except OAuthEndpointError as e:
            network_interval = interval
            if e.code == "authorization_pending":
                continue
            if e.code == "slow_down":
                interval += SLOW_DOWN_STEP
                note(f"the server asked to poll more slowly; now every {interval:g} s")
                continue
            if e.code == "expired_token":
                raise AuthorizationFailed(
                    "the code expired before anyone signed in; run the command again"
                ) from None
            # RFC 8628 says access_denied; Microsoft says authorization_declined.
            if e.code in ("access_denied", "authorization_declined"):
                raise AuthorizationFailed(
                    f"the sign-in was declined ({e.code}); nothing was stored"
                ) from None
            raise AuthorizationFailed(f"the provider refused the grant: {_explain(e)}") from None
        except OAuthUnavailable as e:
            # RFC 8628 3.5: back off exponentially on connection problems.
            network_interval = min(MAX_NETWORK_INTERVAL, max(network_interval, interval) * 2)
            note(f"polling failed ({e}); retrying in {network_interval:g} s")
            continue
        return tokens


def _explain(error: OAuthEndpointError) -> str:
    """The provider's words, then what to do about them when they are known."""
    if error.refusal is None:
        return str(error)
    return f"{error} [{error.refusal.code}: {error.refusal.advice}]"
