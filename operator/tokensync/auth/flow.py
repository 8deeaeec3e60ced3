"""The token lifecycle as a generator, so the sync and async managers share one logic.

Like httpx's ``Auth.auth_flow``, :func:`renew_flow` never does I/O. It yields
steps and the driver (``TokenManager`` or ``AsyncTokenManager``) performs them:

* :class:`Post` — send this form to the token endpoint; the driver sends back the
  parsed :class:`TokenSet`, or throws the :class:`TokenError` it got.
* :class:`Persist` — remember this token set in memory and in the store before
  going on; the driver sends back ``None``.

The order of decisions, each a lesson from real identity providers:

1. A held refresh token that is not known to be expired is used first: it is
   cheaper for the server than a password or client-credentials grant.
2. ``invalid_grant`` on refresh means the refresh token is dead (expired, revoked,
   or its family was revoked after a reuse). A provider with long-lived
   credentials re-authenticates; a :class:`RefreshTokenAuth` cannot, so the caller
   gets :class:`ReauthenticationRequired`.
3. A refresh whose answer was lost may have rotated the refresh token on the
   server. Sending the same refresh token again is, to the server, a *reuse*,
   and servers with reuse protection then revoke the whole token family. So when
   the provider can re-authenticate, the refresh token is persisted as spent and a
   full grant follows; only a refresh-token-only provider keeps it (nothing better
   exists) and lets the caller retry.
4. Every new token set is persisted before it is returned, so a rotated refresh
   token is never only in memory when the caller starts using the access token.
"""

from __future__ import annotations

import email.utils
import json
import logging
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from tokensync.auth.errors import (
    OAUTH_ERRORS,
    InvalidClientError,
    InvalidGrantError,
    InvalidResponseError,
    OAuthError,
    RateLimitedError,
    ReauthenticationRequired,
    ResponseLostError,
    ServerUnavailableError,
    redact,
)
from tokensync.auth.providers import AuthProvider
from tokensync.models.tokens import TokenSet, utcnow

__all__ = ["Persist", "Post", "Step", "parse_retry_after", "parse_token_response", "renew_flow"]

logger = logging.getLogger("tokensync.auth")


@dataclass(frozen=True)
class Post:
    """One token request. ``kind`` tells the driver's metrics which grant it was."""

    data: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    kind: Literal["grant", "refresh"]
    grant_type: str
    secrets: tuple[str, ...] = field(repr=False)
    previous_refresh_token: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class Persist:
    """Keep this token set (memory first, then the store) before going on."""

    token_set: TokenSet


Step = Post | Persist


def _post(
    provider: AuthProvider,
    form: dict[str, str],
    *,
    token_url: str,
    kind: Literal["grant", "refresh"],
    previous_refresh_token: Any = None,
) -> Post:
    data = dict(form)
    headers = {"Accept": "application/json"}
    provider.client_auth.apply(data=data, headers=headers, token_url=token_url)
    secrets = (*provider.secret_values(), *(v for k, v in data.items() if k in _SECRET_FIELDS))
    return Post(
        data=data,
        headers=headers,
        kind=kind,
        grant_type=form["grant_type"],
        secrets=secrets,
        previous_refresh_token=previous_refresh_token,
    )


_SECRET_FIELDS = frozenset({"password", "client_secret", "refresh_token", "client_assertion", "totp", "otp", "code"})


def renew_flow(
    provider: AuthProvider,
    current: TokenSet | None,
    *,
    token_url: str,
    refresh_skew: float = 0.0,
) -> Generator[Step, Any, TokenSet]:
    """Get a new token set, starting from ``current`` (which may be ``None``)."""
    if current is not None and current.refresh_token is not None and current.refresh_valid(refresh_skew):
        refresh_token = current.refresh_token
        step = _post(
            provider,
            provider.refresh_data(refresh_token.get_secret_value()),
            token_url=token_url,
            kind="refresh",
            previous_refresh_token=refresh_token,
        )
        try:
            new: TokenSet | None = yield step
        except InvalidGrantError as exc:
            if not provider.can_reauthenticate:
                raise _reauthentication_required(exc) from None
            logger.info("refresh token rejected (%s); re-authenticating", exc.error)
            yield Persist(_spent(current))
            new = None
        except ResponseLostError:
            if not provider.can_reauthenticate:
                raise
            # The server may have rotated it already: presenting it again would be
            # a reuse. Persist it as spent *before* the new grant, so a crash in
            # between does not bring it back from the store.
            logger.info("refresh response lost; not reusing the refresh token, re-authenticating")
            yield Persist(_spent(current))
            new = None
        if new is not None:
            yield Persist(new)
            return new

    try:
        new = yield _post(provider, provider.grant_data(), token_url=token_url, kind="grant")
    except InvalidGrantError as exc:
        if not provider.can_reauthenticate:
            raise _reauthentication_required(exc) from None
        raise
    assert new is not None
    yield Persist(new)
    return new


def _spent(token_set: TokenSet) -> TokenSet:
    """The same token set without its refresh token, which must not be presented again."""
    return token_set.model_copy(update={"refresh_token": None, "refresh_expires_at": None})


def _reauthentication_required(exc: InvalidGrantError) -> ReauthenticationRequired:
    return ReauthenticationRequired(
        f"the refresh token was rejected ({exc}); a new refresh token is required",
        error=exc.error,
        description=exc.description,
        status_code=exc.status_code,
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or utcnow())).total_seconds())


def parse_token_response(
    status_code: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    secrets: Iterable[str] = (),
    previous_refresh_token: Any = None,
    now: datetime | None = None,
) -> TokenSet:
    """Turn one HTTP answer of a token endpoint into a token set or an error of the tree."""
    secrets = tuple(secrets)
    content_type = headers.get("content-type", "").split(";")[0].strip() or "no content type"
    retry_after = parse_retry_after(headers.get("retry-after"))
    payload: Any
    try:
        payload = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        payload = None

    if 200 <= status_code < 300:
        if not isinstance(payload, dict):
            raise InvalidResponseError(
                f"token endpoint answered HTTP {status_code} with a non-JSON body ({content_type}, {len(body)} bytes)",
                status_code=status_code,
            )
        try:
            return TokenSet.from_response(payload, now=now, previous_refresh_token=previous_refresh_token)
        except ValueError:
            raise InvalidResponseError(
                f"token endpoint answered HTTP {status_code} without an access_token",
                status_code=status_code,
            ) from None

    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, str) and error:
        code = redact(error, secrets)[:64]
        raw_description = payload.get("error_description")
        description = redact(raw_description, secrets) if isinstance(raw_description, str) else None
        message = f"token endpoint answered HTTP {status_code} {code}"
        if description:
            message += f": {description}"
        kwargs: dict[str, Any] = {"error": code, "description": description, "status_code": status_code}
        if code == "temporarily_unavailable":
            raise ServerUnavailableError(message, retry_after=retry_after, **kwargs)
        if code == "slow_down" or status_code == 429:
            raise RateLimitedError(message, retry_after=retry_after, **kwargs)
        if status_code >= 500:
            raise ServerUnavailableError(message, retry_after=retry_after, **kwargs)
        raise OAUTH_ERRORS.get(code, OAuthError)(message, **kwargs)

    if status_code == 429:
        raise RateLimitedError(
            f"token endpoint answered HTTP 429 (rate limited, retry after {retry_after}s)",
            status_code=429,
            retry_after=retry_after,
        )
    if status_code >= 500:
        raise ServerUnavailableError(
            f"token endpoint answered HTTP {status_code} ({content_type})",
            status_code=status_code,
            retry_after=retry_after,
        )
    if status_code == 401:
        # RFC 6749 5.2 lets a server answer a failed client authentication with a
        # bare 401 and a WWW-Authenticate challenge.
        raise InvalidClientError(
            "token endpoint answered HTTP 401 without an OAuth error: client authentication failed",
            error="invalid_client",
            status_code=401,
        )
    raise InvalidResponseError(
        f"token endpoint answered HTTP {status_code} with no OAuth error ({content_type}, {len(body)} bytes)",
        status_code=status_code,
        retry_after=retry_after,
    )
