"""Provider modes of the test authorization server: Entra ID and Google, as they document.

`AuthServer(mode="entra")` and `AuthServer(mode="google")` keep the test
server's grants, tokens and controls, and change what a real provider
changes, so a preset's default path is exercised against its provider's
rules rather than against ours:

Entra ID (Microsoft identity platform v2.0):
- URLs are ``/{tenant}/oauth2/v2.0/{token,devicecode,authorize}``; client
  credentials on ``common``/``organizations``/``consumers`` are refused
  (AADSTS9001023);
- errors have Microsoft's documented shape: ``error``, ``error_description``
  starting with the AADSTS text and ending with trace/correlation ids and a
  timestamp, ``error_codes``, ``timestamp``, ``trace_id``, ``correlation_id``;
- the app is a public client ("Allow public client flows"): a device-code or
  native code-flow request, or the refresh of their tokens, that presents a
  client secret is refused (AADSTS700025); client credentials need the
  secret (AADSTS7000218 without, AADSTS7000215 when wrong);
- refresh tokens rotate on every use; the device flow answers
  ``authorization_declined`` and has no ``verification_uri_complete``;
- the registered redirect is ``http://localhost`` (any port).

Google:
- the device flow allows only a short list of scopes: the mail scope gets
  ``invalid_scope``; its answer says ``verification_url``;
- Desktop-app clients send their secret with the code exchange and refresh
  (``invalid_request: client_secret is missing.`` otherwise); refresh tokens
  do not rotate; a revoked grant is ``invalid_grant: Token has been expired
  or revoked.``; the loopback redirect is ``http://127.0.0.1:PORT``;
- no client credentials grant (``unsupported_grant_type``); service
  accounts use the JWT bearer grant: the assertion's RS256 signature is
  verified against the public key the test registered, and ``iss``,
  ``aud``, ``scope``, ``iat``/``exp`` (at most an hour) and ``sub`` (a
  mailbox the service account may act for) are checked;
- ``POST /revoke`` revokes the grant a token belongs to (RFC 7009).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

if TYPE_CHECKING:
    from tests.harness.oauth_server import AuthServer

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SHARED_TENANTS = frozenset({"common", "organizations", "consumers"})
GOOGLE_MAIL_SCOPE = "https://mail.google.com/"
# developers.google.com/identity/protocols/oauth2/limited-input-device#allowedscopes
GOOGLE_DEVICE_SCOPES = frozenset(
    {
        "openid",
        "email",
        "profile",
        "https://www.googleapis.com/auth/userinfo.email",
        "https://www.googleapis.com/auth/userinfo.profile",
        "https://www.googleapis.com/auth/drive.appdata",
        "https://www.googleapis.com/auth/drive.file",
        "https://www.googleapis.com/auth/youtube",
        "https://www.googleapis.com/auth/youtube.readonly",
    }
)
# Grants where an Entra public client authenticates with its id alone.
_PUBLIC_GRANTS = frozenset({DEVICE_GRANT, "authorization_code", "refresh_token"})

# AADSTS texts, as Microsoft's error code reference words them.
ENTRA_TEXTS = {
    700025: "Client is public so neither 'client_assertion' nor 'client_secret' should be "
    "presented.",
    7000218: "The request body must contain the following parameter: 'client_assertion' or "
    "'client_secret'.",
    7000215: "Invalid client secret provided. Ensure the secret being sent in the request is "
    "the client secret value, not the client secret ID, for a secret added to app.",
    9001023: "The grant type isn't supported over the /common or /consumers endpoints. "
    "Please use the /organizations or tenant-specific endpoint.",
    700016: "Application with identifier was not found in the directory.",
    70008: "The provided authorization code or refresh token has expired due to inactivity.",
    50173: "The provided grant has expired due to it being revoked, a fresh auth token is needed.",
    700082: "The refresh token has expired due to inactivity.",
    70016: "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
    50126: "Error validating credentials due to invalid username or password.",
    50011: "The redirect URI specified in the request does not match the redirect URIs "
    "configured for the application.",
}


def entra_error(status: int, error: str, number: int) -> tuple[int, dict[str, Any]]:
    """Microsoft's token endpoint error, in its documented shape."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    return status, {
        "error": error,
        "error_description": f"AADSTS{number}: {ENTRA_TEXTS.get(number, 'Error.')}\r\n"
        f"Trace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {stamp}",
        "error_codes": [number],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": "https://login.microsoftonline.com/error?code=" + str(number),
    }


# -- what each mode refuses before the grant is looked at --------------------------------


def tenant_of(path: str) -> str | None:
    match = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/[a-z]+", path)
    return match.group(1) if match else None


def refuse_client(
    server: AuthServer, grant: str, form: dict[str, str], path: str
) -> tuple[int, dict[str, Any]] | None:
    """Client authentication as the mode's provider does it; None: go on."""
    if server.mode == "entra":
        return _entra_client(server, grant, form, path)
    if server.mode == "google":
        return _google_client(server, grant, form)
    return None


def _entra_client(
    server: AuthServer, grant: str, form: dict[str, str], path: str
) -> tuple[int, dict[str, Any]] | None:
    if form.get("client_id") != server.client_id:
        return entra_error(400, "unauthorized_client", 700016)
    secret = form.get("client_secret")
    if grant == "client_credentials":
        if (tenant_of(path) or "").lower() in SHARED_TENANTS:
            return entra_error(400, "invalid_request", 9001023)
        if secret is None:
            return entra_error(401, "invalid_client", 7000218)
        if secret != server.client_secret:
            return entra_error(401, "invalid_client", 7000215)
        return None
    if grant in _PUBLIC_GRANTS:
        public = server.public_client
        if grant == "refresh_token":
            record = server.refresh.get(form.get("refresh_token", ""))
            public = record.public if record is not None else public
        if public and secret is not None:
            server.counts["secret_from_public_client"] += 1
            return entra_error(401, "invalid_client", 700025)
        if not public and secret != server.client_secret:
            return entra_error(401, "invalid_client", 7000218)
    return None


def _google_client(
    server: AuthServer, grant: str, form: dict[str, str]
) -> tuple[int, dict[str, Any]] | None:
    if grant == JWT_BEARER:
        return None  # the assertion authenticates
    if grant == "client_credentials":
        return 400, {
            "error": "unsupported_grant_type",
            "error_description": "Invalid grant_type: client_credentials",
        }
    if form.get("client_id") != server.client_id:
        return 401, {
            "error": "invalid_client",
            "error_description": "The OAuth client was not found.",
        }
    secret = form.get("client_secret")
    if server.client_secret is not None and secret is None:
        return 400, {"error": "invalid_request", "error_description": "client_secret is missing."}
    if server.client_secret is not None and secret != server.client_secret:
        return 401, {"error": "invalid_client", "error_description": "Unauthorized"}
    return None


def grant_error(
    server: AuthServer, status: int, error: str, detail: str
) -> tuple[int, dict[str, Any]]:
    """An error about the grant itself (expired, revoked, pending), per mode."""
    if server.mode == "entra":
        number = {
            "revoked": 50173,
            "expired": 70008,
            "authorization_pending": 70016,
        }.get(detail)
        if number is not None:
            return entra_error(status, error, number)
    if server.mode == "google" and error == "invalid_grant":
        return status, {
            "error": "invalid_grant",
            "error_description": "Token has been expired or revoked.",
        }
    if server.mode == "entra" and error == "access_denied":
        return status, {
            "error": "authorization_declined",
            "error_description": "The end user denied the authorization request.",
        }
    body: dict[str, Any] = {"error": error}
    if detail and detail not in ("revoked", "expired", "authorization_pending", "plain"):
        body["error_description"] = detail
    return status, body


# -- device authorization -------------------------------------------------------------------


def refuse_device(server: AuthServer, form: dict[str, str]) -> tuple[int, dict[str, Any]] | None:
    if server.mode == "google":
        scopes = form.get("scope", "").split()
        if any(scope not in GOOGLE_DEVICE_SCOPES for scope in scopes):
            return 400, {"error": "invalid_scope"}
    if server.mode == "entra" and form.get("client_secret") is not None and server.public_client:
        server.counts["secret_from_public_client"] += 1
        return entra_error(401, "invalid_client", 700025)
    return None


def device_answer(server: AuthServer, answer: dict[str, Any]) -> dict[str, Any]:
    if server.mode == "google":
        answer["verification_url"] = answer.pop("verification_uri")
    if server.mode == "entra":
        answer["message"] = (
            f"To sign in, use a web browser to open the page {answer['verification_uri']} "
            f"and enter the code {answer['user_code']} to authenticate."
        )
    return answer


def redirect_allowed(server: AuthServer, redirect: str) -> bool:
    """The registered loopback redirect, in the provider's documented form."""
    if server.mode == "entra":
        # Registered as http://localhost; Microsoft ignores the port.
        return re.fullmatch(r"http://localhost(:\d+)?/?", redirect) is not None
    if server.mode == "google":
        return re.fullmatch(r"http://(127\.0\.0\.1|\[::1\]):\d+/?", redirect) is not None
    return True


# -- Google's JWT bearer grant (service accounts) ----------------------------


def new_service_account(server: AuthServer, email: str, mailboxes: list[str]) -> dict[str, str]:
    """Register a service account and return its JSON key file, as Google's
    console would download it (the key pair is generated here)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key_id = secrets.token_hex(20)
    server.service_accounts[email] = {
        "public_key": public.decode("ascii"),
        "key_id": key_id,
        "mailboxes": mailboxes,
    }
    return {
        "type": "service_account",
        "project_id": "gateway-test",
        "private_key_id": key_id,
        "private_key": pem,
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": f"{server.base_url}/token",
    }


def jwt_bearer(server: AuthServer, form: dict[str, str], path: str) -> tuple[int, dict[str, Any]]:
    server.counts["jwt_bearer"] += 1
    parts = form.get("assertion", "").split(".")
    if len(parts) != 3:
        return 400, {"error": "invalid_grant", "error_description": "Invalid JWT."}
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except ValueError:
        return 400, {"error": "invalid_grant", "error_description": "Invalid JWT."}
    account = server.service_accounts.get(claims.get("iss", ""))
    if header.get("alg") != "RS256" or account is None:
        return 401, {
            "error": "invalid_client",
            "error_description": "The OAuth client was not found.",
        }
    public = serialization.load_pem_public_key(account["public_key"].encode("ascii"))
    assert isinstance(public, rsa.RSAPublicKey)
    try:
        public.verify(
            signature, f"{parts[0]}.{parts[1]}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
    except InvalidSignature:
        return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
    now = server.now()
    iat, exp = claims.get("iat"), claims.get("exp")
    if not isinstance(iat, int) or not isinstance(exp, int) or exp - iat > 3600 or exp <= now:
        return 400, {
            "error": "invalid_grant",
            "error_description": "Invalid JWT: Token must be a short-lived token (60 minutes) "
            "and in a reasonable timeframe.",
        }
    if claims.get("aud") != f"{server.base_url}{path}":
        return 400, {"error": "invalid_grant", "error_description": "Invalid JWT: aud"}
    scope = claims.get("scope", "")
    subject = claims.get("sub")
    if GOOGLE_MAIL_SCOPE not in str(scope).split() or subject not in account["mailboxes"]:
        # What Google answers when domain-wide delegation is missing.
        return 401, {
            "error": "unauthorized_client",
            "error_description": "Client is unauthorized to retrieve access tokens using this "
            "method, or client not authorized for any of the scopes requested.",
        }
    server.counts[f"jwt_bearer:{subject}"] += 1
    return 200, server._issue(str(subject), claims["iss"], str(scope), refresh=False)


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise ValueError("bad base64url") from None


# -- RFC 7009 revocation (Google) ---------------------------------------------


def revoke(server: AuthServer, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """Revoke the grant the token belongs to: the refresh token (or the access
    token) named, nothing of the user's other grants."""
    server.counts["revoke"] += 1
    token = form.get("token", "")
    refresh = server.refresh.get(token)
    access = server.access.get(token)
    known = refresh if refresh is not None else access
    if known is None or not known.active:
        return 400, {"error": "invalid_token", "error_description": "Token expired or revoked"}
    known.active = False
    return 200, {}
