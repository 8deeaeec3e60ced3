"""Errors of the token library: one tree, split by what the caller should do next.

::

    TokenError
    ├── PermanentTokenError            a human must change something; retrying is useless
    │   ├── OAuthError                 RFC 6749 5.2 error response (unknown codes land here)
    │   │   ├── InvalidRequestError        invalid_request
    │   │   ├── InvalidClientError         invalid_client (also a bare 401)
    │   │   ├── InvalidGrantError          invalid_grant
    │   │   ├── UnauthorizedClientError    unauthorized_client
    │   │   ├── UnsupportedGrantTypeError  unsupported_grant_type
    │   │   └── InvalidScopeError          invalid_scope
    │   ├── ReauthenticationRequired   the refresh token is dead and the provider holds no
    │   │                              credentials to get a new one (RefreshTokenAuth)
    │   └── ConfigurationError         the token URL cannot work (bad scheme, no discovery)
    └── TransientTokenError            retry later, with backoff; ``retry_after`` when known
        ├── ServerUnavailableError     HTTP 5xx, temporarily_unavailable
        ├── RateLimitedError           HTTP 429, slow_down
        ├── InvalidResponseError       200 without a token, HTML or other non-JSON bodies
        └── TokenTransportError        no HTTP answer at all
            ├── EndpointUnreachableError   the request never left (connect refused/timeout):
            │                              safe to repeat with the same refresh token
            └── ResponseLostError          sent, but the answer was lost (read timeout,
                                           connection reset): the server may have rotated
                                           the refresh token already

Messages carry the HTTP status, the OAuth ``error`` code and a bounded
``error_description`` with every known secret of the request redacted; never a
token, a secret or a full response body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "ConfigurationError",
    "EndpointUnreachableError",
    "InvalidClientError",
    "InvalidGrantError",
    "InvalidRequestError",
    "InvalidResponseError",
    "InvalidScopeError",
    "OAuthError",
    "PermanentTokenError",
    "RateLimitedError",
    "ReauthenticationRequired",
    "ResponseLostError",
    "ServerUnavailableError",
    "TokenError",
    "TokenTransportError",
    "TransientTokenError",
    "UnauthorizedClientError",
    "UnsupportedGrantTypeError",
    "redact",
]

_MAX_DESCRIPTION = 200
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


def redact(text: str, secrets: Iterable[str]) -> str:
    """Remove every known secret from a server-controlled text and bound its size.

    Servers occasionally echo request parameters in ``error_description``; the
    text then travels into logs, Kubernetes Events and CR status, so it is cleaned
    before it is ever stored in an exception.
    """
    cleaned = _UNPRINTABLE.sub(" ", text)
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        cleaned = cleaned.replace(secret, "[redacted]")
    if len(cleaned) > _MAX_DESCRIPTION:
        cleaned = cleaned[: _MAX_DESCRIPTION - 1] + "…"
    return cleaned


class TokenError(Exception):
    """Any failure to obtain a token.

    ``error`` is the OAuth error code when the server sent one, ``status_code``
    the HTTP status when there was an HTTP answer.
    """

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        description: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.description = description
        self.status_code = status_code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class PermanentTokenError(TokenError):
    """Retrying the same request cannot succeed until a human changes something."""


class TransientTokenError(TokenError):
    """The same request may succeed later; ``retry_after`` is the server's hint in seconds."""

    def __init__(
        self,
        message: str,
        *,
        error: str | None = None,
        description: str | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, error=error, description=description, status_code=status_code)
        self.retry_after = retry_after


class OAuthError(PermanentTokenError):
    """The token endpoint answered with an RFC 6749 5.2 error response."""


class InvalidRequestError(OAuthError):
    """``invalid_request``: a parameter is missing, repeated or malformed."""


class InvalidClientError(OAuthError):
    """``invalid_client``: client authentication failed (wrong secret, unknown client)."""


class InvalidGrantError(OAuthError):
    """``invalid_grant``: wrong password, or an expired, revoked or reused refresh token."""


class UnauthorizedClientError(OAuthError):
    """``unauthorized_client``: this client may not use this grant type."""


class UnsupportedGrantTypeError(OAuthError):
    """``unsupported_grant_type``: the server does not offer this grant."""


class InvalidScopeError(OAuthError):
    """``invalid_scope``: a requested scope is unknown or not allowed."""


class ReauthenticationRequired(PermanentTokenError):
    """The refresh token was rejected and there are no credentials to get a new one."""


class ConfigurationError(PermanentTokenError):
    """The token endpoint cannot be used as configured (URL scheme, discovery document)."""


class ServerUnavailableError(TransientTokenError):
    """HTTP 5xx or ``temporarily_unavailable``."""


class RateLimitedError(TransientTokenError):
    """HTTP 429 or ``slow_down``; honour ``retry_after``."""


class InvalidResponseError(TransientTokenError):
    """A body that is not a token response: HTML error pages, truncated JSON, no token."""


class TokenTransportError(TransientTokenError):
    """No HTTP answer arrived."""


class EndpointUnreachableError(TokenTransportError):
    """The request never reached the server, so nothing was spent."""


class ResponseLostError(TokenTransportError):
    """The request was sent but its answer was lost; a refresh token may be spent."""


OAUTH_ERRORS: dict[str, type[OAuthError]] = {
    "invalid_request": InvalidRequestError,
    "invalid_client": InvalidClientError,
    "invalid_grant": InvalidGrantError,
    "unauthorized_client": UnauthorizedClientError,
    "unsupported_grant_type": UnsupportedGrantTypeError,
    "invalid_scope": InvalidScopeError,
}
