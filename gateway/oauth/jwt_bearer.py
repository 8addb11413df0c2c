"""The JWT bearer grant (RFC 7523) with a Google service account's key.

Google has no client-credentials grant; a Workspace admin instead lets a
service account act for the domain's mailboxes ("domain-wide delegation").
The gateway then signs a short JWT with the service account's private key
and trades it at the token endpoint for an access token of one mailbox:

    header  {"alg": "RS256", "typ": "JWT", "kid": private_key_id}
    claims  {"iss": client_email, "scope": "https://mail.google.com/",
             "aud": token URL, "sub": the mailbox, "iat": now, "exp": now + 1 h}

(Google, "Using OAuth 2.0 for Server to Server Applications": "Preparing to
make a delegated API call", the JWT's claim set and its one-hour limit.)

Signed with `cryptography` (RSASSA-PKCS1-v1_5 with SHA-256, which is what
RS256 means, RFC 7518 3.3), which the token store already depends on.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from gateway.model import Secret, ServiceAccountKey

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google accepts at most an hour between iat and exp.
LIFETIME = 3600


class ServiceAccountKeyError(ValueError):
    """A service account key file the gateway cannot use; the text says why."""


def load_service_account(text: str) -> ServiceAccountKey:
    """Parse a service account's JSON key file (as the Google Cloud console
    downloads it) and check that its private key is an RSA key."""
    try:
        document = json.loads(text)
    except ValueError:
        raise ServiceAccountKeyError("not a JSON key file") from None
    if not isinstance(document, dict):
        raise ServiceAccountKeyError("not a JSON key file")
    kind = document.get("type")
    if kind != "service_account":
        raise ServiceAccountKeyError(
            f"type is {str(kind)[:40]!r}, not 'service_account' (download the key of a "
            "service account: IAM & Admin > Service accounts > Keys > Add key > JSON)"
        )
    fields: dict[str, str] = {}
    for name in ("client_email", "private_key", "token_uri"):
        value = document.get(name)
        if not isinstance(value, str) or not value:
            raise ServiceAccountKeyError(f"the key file has no {name}")
        fields[name] = value
    key_id = document.get("private_key_id")
    _private_key(fields["private_key"])
    return ServiceAccountKey(
        client_email=fields["client_email"],
        private_key=Secret(fields["private_key"]),
        token_uri=fields["token_uri"],
        private_key_id=key_id if isinstance(key_id, str) and key_id else None,
    )


def _private_key(pem: str) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode("ascii"), password=None)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ServiceAccountKeyError("its private_key is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ServiceAccountKeyError("its private_key is not an RSA key (RS256 needs one)")
    return key


def signed_assertion(
    account: ServiceAccountKey, *, subject: str, scopes: tuple[str, ...], audience: str, now: float
) -> str:
    """The compact JWS of the grant's assertion (RFC 7523 2.1, RFC 7515 7.1)."""
    header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if account.private_key_id:
        header["kid"] = account.private_key_id
    issued = int(now)
    claims = {
        "iss": account.client_email,
        "scope": " ".join(scopes),
        "aud": audience,
        "sub": subject,
        "iat": issued,
        "exp": issued + LIFETIME,
    }
    signing_input = f"{_b64(_json(header))}.{_b64(_json(claims))}".encode("ascii")
    key = _private_key(account.private_key.reveal())
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{_b64(signature)}"


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


__all__ = [
    "JWT_BEARER_GRANT",
    "LIFETIME",
    "ServiceAccountKeyError",
    "load_service_account",
    "signed_assertion",
]
