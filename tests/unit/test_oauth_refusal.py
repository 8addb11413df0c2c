"""The token endpoint's refusals sorted into what an admin does about them.

The bodies are the shapes the providers document: Microsoft's token
endpoint error (error, error_description with the AADSTS text, error_codes,
timestamp, trace_id, correlation_id) and Google's {error, error_description}.
"""

from __future__ import annotations

import pytest

from gateway.oauth.refusal import (
    Refusal,
    RefusalKind,
    classify_token_answer,
    entra_codes,
    network_refusal,
)


def entra_body(error: str, number: int, text: str) -> dict[str, object]:
    """Microsoft's documented token endpoint error shape."""
    trace = "4457d068-2a03-42b2-97f2-d55325289d86"
    correlation = "6b3474d8-233e-463f-b0a3-86433d8ba889"
    return {
        "error": error,
        "error_description": f"AADSTS{number}: {text}\r\nTrace ID: {trace}\r\n"
        f"Correlation ID: {correlation}\r\nTimestamp: 2026-12-05 21:00:00Z",
        "error_codes": [number],
        "timestamp": "2026-12-05 21:00:00Z",
        "trace_id": trace,
        "correlation_id": correlation,
    }


@pytest.mark.parametrize(
    ("error", "number", "text", "kind"),
    [
        (
            "invalid_grant",
            700082,
            "The refresh token has expired due to inactivity.",
            "REAUTHORIZE",
        ),
        (
            "invalid_grant",
            50173,
            "The provided grant has expired due to it being revoked.",
            "REAUTHORIZE",
        ),
        (
            "invalid_grant",
            70000,
            "The provided value for the input parameter is not valid.",
            "REAUTHORIZE",
        ),
        (
            "invalid_grant",
            70008,
            "The provided authorization code or refresh token has expired.",
            "REAUTHORIZE",
        ),
        (
            "invalid_grant",
            70043,
            "The refresh token has expired or is invalid due "
            "to sign-in frequency checks by conditional access.",
            "REAUTHORIZE",
        ),
        (
            "invalid_grant",
            50076,
            "Due to a configuration change made by your "
            "administrator, you must use multi-factor authentication.",
            "REAUTHORIZE",
        ),
        (
            "invalid_grant",
            50079,
            "The user is required to use multi-factor authentication.",
            "REAUTHORIZE",
        ),
        (
            "invalid_grant",
            53003,
            "Access has been blocked by Conditional Access policies.",
            "REAUTHORIZE",
        ),
        (
            "invalid_grant",
            65001,
            "The user or administrator has not consented to use the application.",
            "REAUTHORIZE",
        ),
        ("invalid_client", 7000215, "Invalid client secret provided.", "MISCONFIGURED"),
        (
            "invalid_client",
            7000222,
            "The provided client secret keys are expired.",
            "MISCONFIGURED",
        ),
        (
            "unauthorized_client",
            700016,
            "Application with identifier was not found in the directory.",
            "MISCONFIGURED",
        ),
        (
            "invalid_client",
            700025,
            "Client is public so neither "
            "'client_assertion' nor 'client_secret' should be presented.",
            "MISCONFIGURED",
        ),
        (
            "invalid_client",
            7000218,
            "The request body must contain the following "
            "parameter: 'client_assertion' or 'client_secret'.",
            "MISCONFIGURED",
        ),
        (
            "invalid_request",
            9001023,
            "The grant type isn't supported over the /common or /consumers endpoints.",
            "MISCONFIGURED",
        ),
        (
            "invalid_request",
            50196,
            "The server terminated an operation because it encountered a client request loop.",
            "TEMPORARY",
        ),
    ],
)
def test_entra_codes_decide_over_the_generic_error(
    error: str, number: int, text: str, kind: str
) -> None:
    refusal = classify_token_answer(400, entra_body(error, number, text), account="alice")
    assert refusal.kind is RefusalKind[kind]
    assert refusal.code == f"AADSTS{number}"
    assert refusal.advice and "\n" not in refusal.advice
    if refusal.kind is RefusalKind.REAUTHORIZE and "authorize" in refusal.advice:
        assert "{account}" not in refusal.advice


def test_the_advice_names_the_account_to_authorize_again() -> None:
    refusal = classify_token_answer(400, entra_body("invalid_grant", 700082, "x"), account="alice")
    assert "gateway oauth authorize alice" in refusal.advice


def test_the_aadsts_number_is_read_from_the_description_without_error_codes() -> None:
    body = {"error": "invalid_client", "error_description": "AADSTS7000222: expired."}
    assert entra_codes(body) == [7000222]
    assert classify_token_answer(401, body).kind is RefusalKind.MISCONFIGURED


def test_an_unknown_aadsts_number_falls_back_to_the_error_but_keeps_the_number() -> None:
    refusal = classify_token_answer(400, entra_body("invalid_grant", 123456, "new code"))
    assert refusal.kind is RefusalKind.REAUTHORIZE
    assert refusal.code == "AADSTS123456"


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (
            {"error": "invalid_grant", "error_description": "Token has been expired or revoked."},
            "REAUTHORIZE",
        ),
        ({"error": "admin_policy_enforced"}, "REAUTHORIZE"),
        ({"error": "org_internal"}, "MISCONFIGURED"),
        (
            {"error": "deleted_client", "error_description": "The OAuth client was deleted."},
            "MISCONFIGURED",
        ),
        (
            {
                "error": "unauthorized_client",
                "error_description": "Client is unauthorized to "
                "retrieve access tokens using this method.",
            },
            "MISCONFIGURED",
        ),
        ({"error": "invalid_scope"}, "MISCONFIGURED"),
        ({"error": "invalid_client", "error_description": "Unauthorized"}, "MISCONFIGURED"),
        ({"error_code": "rate_limit_exceeded"}, "TEMPORARY"),
    ],
)
def test_google_errors(body: dict[str, object], kind: str) -> None:
    refusal = classify_token_answer(403 if "error_code" in body else 400, body)
    assert refusal.kind is RefusalKind[kind]
    assert refusal.code == body.get("error", body.get("error_code"))


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
def test_server_trouble_and_throttling_are_temporary(status: int) -> None:
    refusal = classify_token_answer(status, None)
    assert refusal == Refusal(RefusalKind.TEMPORARY, f"http_{status}", refusal.advice)


def test_a_4xx_without_an_oauth_error_is_a_configuration_problem() -> None:
    refusal = classify_token_answer(404, None)
    assert (refusal.kind, refusal.code) == (RefusalKind.MISCONFIGURED, "http_404")


def test_network_failures_are_temporary() -> None:
    assert network_refusal("timeout").kind is RefusalKind.TEMPORARY


def test_the_kinds_travel_as_their_values() -> None:
    refusal = classify_token_answer(400, {"error": "org_internal"})
    assert refusal.as_dict()["kind"] == "misconfigured"
    assert "org_internal" in str(refusal)
    assert {k.name for k in RefusalKind} == {
        "REAUTHORIZE",
        "MISCONFIGURED",
        "TEMPORARY",
        "TOKEN_REFUSED",
    }


def test_the_admin_guide_lists_every_classified_code() -> None:
    from pathlib import Path

    from gateway.oauth.refusal import ENTRA_CODES, GOOGLE_CODES

    guide = (Path(__file__).parents[2] / "docs" / "oauth-errors.md").read_text()
    assert [n for n in ENTRA_CODES if f"| AADSTS{n} |" not in guide] == []
    assert [e for e in GOOGLE_CODES if f"| `{e}` |" not in guide] == []
