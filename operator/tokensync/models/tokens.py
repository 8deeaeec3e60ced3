"""The token set an OAuth2 token endpoint hands out, with absolute expiry.

Invariants:

* ``expires_at``, ``refresh_expires_at`` and ``issued_at`` are timezone-aware UTC
  datetimes. A relative ``expires_in`` is turned into an absolute instant once, at
  the edge (:meth:`TokenSet.from_response`), because a relative lifetime stored
  somewhere and read back later is silently wrong.
* An unknown expiry (``None``) means "valid until the resource server says 401":
  the caller recovers with ``force_refresh()``.
* Token values are :class:`pydantic.SecretStr`: they never appear in ``repr()``,
  ``str()`` or ``model_dump()``. Only the store codec (:meth:`to_json` /
  :meth:`from_json`) and the explicit accessors reveal them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator

__all__ = ["TokenSet", "jwt_expiry", "utcnow"]


def utcnow() -> datetime:
    """The current instant, UTC-aware; one seam for tests that fake the clock."""
    return datetime.now(UTC)


def jwt_expiry(token: str) -> datetime | None:
    """Read the ``exp`` claim of a JWT without verifying it.

    Only used to learn *when* a token expires when the server omitted
    ``expires_in``; the token's authenticity is the resource server's business.
    Opaque (non-JWT) tokens give ``None``.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        return datetime.fromtimestamp(exp, UTC)
    except (OverflowError, OSError, ValueError):
        return None


MAX_LIFETIME = 10 * 365 * 24 * 3600.0


def _lifetime(value: Any) -> float | None:
    """``expires_in`` as seconds; servers send ints, strings and occasionally junk.

    Capped at ten years: a huge or infinite value must not overflow the datetime
    arithmetic after the server already rotated the refresh token.
    """
    if isinstance(value, bool) or value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, MAX_LIFETIME)


class TokenSet(BaseModel):
    """What one successful grant returned, normalised.

    ``issued_at`` is kept because refresh schedules are relative to the issued
    lifetime (refresh at 80% of it, like the kubelet does for projected tokens).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    access_token: SecretStr
    token_type: str = "Bearer"
    refresh_token: SecretStr | None = None
    id_token: SecretStr | None = None
    scope: str | None = None
    issued_at: datetime
    expires_at: datetime | None = None
    refresh_expires_at: datetime | None = None

    @field_validator("issued_at", "expires_at", "refresh_expires_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    @field_validator("token_type")
    @classmethod
    def _token_type(cls, value: str) -> str:
        # RFC 6749 7.1: the type is case-insensitive; many servers say "bearer",
        # while RFC 6750 resource servers expect the scheme spelled "Bearer".
        return "Bearer" if value.lower() == "bearer" else value

    @classmethod
    def from_response(
        cls,
        payload: Mapping[str, Any],
        *,
        now: datetime | None = None,
        previous_refresh_token: SecretStr | None = None,
    ) -> TokenSet:
        """Build a token set from a token endpoint's JSON body (RFC 6749 5.1).

        ``previous_refresh_token`` is carried over when a refresh response has no
        new refresh token: the server did not rotate it, so the old one stays valid
        (RFC 6749 6).

        Raises ``ValueError`` (without any token value in the text) when the body
        has no usable ``access_token``.
        """
        issued = now or utcnow()
        access = payload.get("access_token")
        if not isinstance(access, str) or not access:
            raise ValueError("token response has no access_token")
        expires_in = _lifetime(payload.get("expires_in"))
        expires_at = issued + timedelta(seconds=expires_in) if expires_in is not None else jwt_expiry(access)
        refresh = payload.get("refresh_token")
        refresh_secret = SecretStr(refresh) if isinstance(refresh, str) and refresh else previous_refresh_token
        refresh_in = _lifetime(payload.get("refresh_expires_in"))
        refresh_expires_at: datetime | None
        if refresh_in is not None and refresh_in > 0:
            refresh_expires_at = issued + timedelta(seconds=refresh_in)
        elif isinstance(refresh, str) and refresh:
            refresh_expires_at = jwt_expiry(refresh)
        else:
            refresh_expires_at = None
        id_token = payload.get("id_token")
        scope = payload.get("scope")
        token_type = payload.get("token_type")
        return cls(
            access_token=SecretStr(access),
            token_type=token_type if isinstance(token_type, str) and token_type else "Bearer",
            refresh_token=refresh_secret,
            id_token=SecretStr(id_token) if isinstance(id_token, str) and id_token else None,
            scope=scope if isinstance(scope, str) else None,
            issued_at=issued,
            expires_at=expires_at,
            refresh_expires_at=refresh_expires_at,
        )

    # -- validity -------------------------------------------------------------------

    def access_valid(self, skew: float = 0.0, *, now: datetime | None = None) -> bool:
        """True while the access token has more than ``skew`` seconds left."""
        if self.expires_at is None:
            return True
        return (now or utcnow()) + timedelta(seconds=skew) < self.expires_at

    def refresh_valid(self, skew: float = 0.0, *, now: datetime | None = None) -> bool:
        """True when a refresh token is held and not known to expire within ``skew``."""
        if self.refresh_token is None:
            return False
        if self.refresh_expires_at is None:
            return True
        return (now or utcnow()) + timedelta(seconds=skew) < self.refresh_expires_at

    @property
    def lifetime(self) -> float | None:
        """The issued lifetime of the access token in seconds, when known."""
        if self.expires_at is None:
            return None
        return (self.expires_at - self.issued_at).total_seconds()

    @property
    def authorization_header(self) -> str:
        """The value for an HTTP ``Authorization`` header (reveals the token)."""
        return f"{self.token_type} {self.access_token.get_secret_value()}"

    # -- store codec ------------------------------------------------------------------

    def to_json(self) -> str:
        """Serialise *with* the secret values, for a CredentialStore only."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict with the secret values revealed, for a CredentialStore only."""

        def reveal(secret: SecretStr | None) -> str | None:
            return secret.get_secret_value() if secret is not None else None

        def stamp(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        return {
            "access_token": reveal(self.access_token),
            "token_type": self.token_type,
            "refresh_token": reveal(self.refresh_token),
            "id_token": reveal(self.id_token),
            "scope": self.scope,
            "issued_at": stamp(self.issued_at),
            "expires_at": stamp(self.expires_at),
            "refresh_expires_at": stamp(self.refresh_expires_at),
        }

    @classmethod
    def from_json(cls, data: str | bytes) -> TokenSet:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on a damaged payload."""
        return cls.model_validate_json(data)
