"""How token endpoint answers are classified: permanent (a human must act) or transient."""

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from tokensync.auth import (
    InvalidClientError,
    InvalidGrantError,
    InvalidRequestError,
    InvalidResponseError,
    InvalidScopeError,
    OAuthError,
    PermanentTokenError,
    RateLimitedError,
    ServerUnavailableError,
    TransientTokenError,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from tokensync.auth.flow import parse_retry_after, parse_token_response

JSON = {"content-type": "application/json"}


def parse(status, body, headers=None, secrets=()):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_token_response(status, headers or JSON, raw, secrets=secrets)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("invalid_request", InvalidRequestError),
        ("invalid_client", InvalidClientError),
        ("invalid_grant", InvalidGrantError),
        ("unauthorized_client", UnauthorizedClientError),
        ("unsupported_grant_type", UnsupportedGrantTypeError),
        ("invalid_scope", InvalidScopeError),
        ("access_denied", OAuthError),
    ],
)
def test_rfc6749_error_codes_are_permanent(code, cls):
    with pytest.raises(cls) as info:
        parse(400, {"error": code, "error_description": "it failed"})
    assert isinstance(info.value, PermanentTokenError)
    assert info.value.error == code
    assert info.value.status_code == 400
    assert str(info.value) == f"token endpoint answered HTTP 400 {code}: it failed"


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (503, {"error": "temporarily_unavailable"}, ServerUnavailableError),
        (400, {"error": "slow_down"}, RateLimitedError),
        (500, {"error": "server_error"}, ServerUnavailableError),
        (502, b"<html><body>Bad gateway</body></html>", ServerUnavailableError),
        (429, b"", RateLimitedError),
        (200, b"<html>login</html>", InvalidResponseError),
        (200, {"token": "x"}, InvalidResponseError),
        (404, b"<html>not found</html>", InvalidResponseError),
    ],
)
def test_outages_and_garbage_are_transient(status, body, cls):
    with pytest.raises(cls) as info:
        parse(status, body, headers={"content-type": "text/html"})
    assert isinstance(info.value, TransientTokenError)
    assert "<html" not in str(info.value)


def test_429_carries_retry_after_in_seconds_or_as_http_date():
    with pytest.raises(RateLimitedError) as info:
        parse(429, b"", headers={"retry-after": "17"})
    assert info.value.retry_after == 17
    later = datetime.now(UTC) + timedelta(seconds=120)
    with pytest.raises(RateLimitedError) as info:
        parse(
            429,
            {"error": "rate_limited"},
            headers={**JSON, "retry-after": format_datetime(later, usegmt=True)},
        )
    assert info.value.retry_after is not None
    assert 100 < info.value.retry_after <= 120
    assert parse_retry_after("garbage") is None


def test_bare_401_means_client_authentication_failed():
    with pytest.raises(InvalidClientError):
        parse(401, b"", headers={"www-authenticate": "Basic"})


def test_description_never_carries_request_secrets_and_is_bounded():
    description = "bad password test-secret-pw for user; " + "x" * 1000
    with pytest.raises(InvalidGrantError) as info:
        parse(400, {"error": "invalid_grant", "error_description": description}, secrets=["test-secret-pw"])
    text = str(info.value)
    assert "test-secret-pw" not in text
    assert "[redacted]" in text
    assert len(text) < 300


def test_success_body_never_appears_in_errors():
    with pytest.raises(InvalidResponseError) as info:
        parse(200, {"acess_token": "test-secret-typo"})
    assert "test-secret" not in str(info.value)
    assert "test-secret" not in repr(info.value)
