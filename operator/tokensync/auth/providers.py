"""Grant providers: what to put in the token request form, and nothing else.

An :class:`AuthProvider` knows the grant (RFC 6749 4.3 password, 4.4 client
credentials, 6 refresh token), the scopes, audience and extra parameters, and how
the client authenticates (:mod:`tokensync.auth.client_auth`). It performs no I/O:
the token managers drive HTTP, so a provider can be built and inspected anywhere,
including from a Kubernetes custom resource.

Invariants:

* :meth:`AuthProvider.grant_data` returns a fresh dict each call, computed at call
  time (a TOTP code from a seed is derived then, not when the provider was built).
* ``can_reauthenticate`` says whether :meth:`grant_data` can mint a new token set
  from long-lived credentials. A :class:`RefreshTokenAuth` cannot: once its refresh
  token is dead, a human must supply a new one.
* ``repr()`` never shows a password, secret, seed, key or token.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, TypedDict, Unpack

import pyotp

from tokensync.auth.client_auth import ClientAuth, ClientAuthMethod, client_auth_for

__all__ = [
    "DEFAULT_CLIENT_ID",
    "AuthProvider",
    "ClientCredentialsAuth",
    "ClientOptions",
    "PasswordAuth",
    "RefreshTokenAuth",
    "Totp",
]

#: The client id used by the password and refresh-token grants when none is given:
#: a public client registered for tokensync at the identity provider.
DEFAULT_CLIENT_ID = "tokensync"


class ClientOptions(TypedDict, total=False):
    """Keyword options shared by every provider."""

    method: ClientAuthMethod | None
    private_key: str | None
    signing_algorithm: Literal["RS256", "ES256"]
    key_id: str | None
    client_auth: ClientAuth | None
    scopes: Sequence[str]
    audience: str | None
    extra_params: Mapping[str, str] | None


@dataclass(frozen=True)
class Totp:
    """A second factor for the password grant: a one-time code, or a seed to derive one.

    A code is spent by the first grant that uses it; a seed (base32, RFC 6238)
    yields the current code at each grant, which is what an unattended operator
    needs.
    """

    code: str | None = field(default=None, repr=False)
    seed: str | None = field(default=None, repr=False)
    digits: int = 6
    interval: int = 30

    def __post_init__(self) -> None:
        if (self.code is None) == (self.seed is None):
            raise ValueError("Totp takes exactly one of code= or seed=")
        if self.seed is not None:
            try:
                pyotp.TOTP(self.seed, digits=self.digits, interval=self.interval).now()
            except Exception as exc:  # binascii.Error, ValueError; never chained: no seed in tracebacks
                reason = str(exc).replace(self.seed, "[redacted]") or type(exc).__name__
                raise ValueError(f"the TOTP seed is not valid base32 ({reason})") from None

    @classmethod
    def parse(cls, value: str | Totp) -> Totp:
        """Accept what users type: 6 to 8 digits is a code, anything else a seed."""
        if isinstance(value, Totp):
            return value
        stripped = value.strip().replace(" ", "")
        if stripped.isdigit() and 6 <= len(stripped) <= 8:
            return cls(code=stripped, digits=len(stripped))
        return cls(seed=stripped)

    def current(self) -> str:
        """The code to send now."""
        if self.code is not None:
            return self.code
        assert self.seed is not None
        return pyotp.TOTP(self.seed, digits=self.digits, interval=self.interval).now()

    def secret_values(self) -> tuple[str, ...]:
        return tuple(v for v in (self.code, self.seed) if v)


class AuthProvider(abc.ABC):
    """Builds the form of a token request for one grant."""

    can_reauthenticate: ClassVar[bool] = True
    grant_type: ClassVar[str]

    client_auth: ClientAuth
    scopes: tuple[str, ...]
    audience: str | None
    extra_params: dict[str, str]

    def _init_client(self, client_id: str, client_secret: str | None, options: ClientOptions) -> None:
        given = options.get("client_auth")
        self.client_auth = given or client_auth_for(
            options.get("method"),
            client_id,
            client_secret=client_secret,
            private_key=options.get("private_key"),
            signing_algorithm=options.get("signing_algorithm", "RS256"),
            key_id=options.get("key_id"),
        )
        self.scopes = tuple(options.get("scopes", ()))
        self.audience = options.get("audience")
        self.extra_params = dict(options.get("extra_params") or {})

    @property
    def client_id(self) -> str:
        return self.client_auth.client_id

    @abc.abstractmethod
    def grant_data(self) -> dict[str, str]:
        """The form fields of a full grant (before client authentication is applied)."""
        raise NotImplementedError

    def refresh_data(self, refresh_token: str) -> dict[str, str]:
        """The form of a refresh_token grant (RFC 6749 6) for a token this provider got.

        No ``scope``: omitting it asks for the originally granted scope, which is
        the only value every server accepts.
        """
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        data.update(self.extra_params)
        return data

    def secret_values(self) -> tuple[str, ...]:
        """Every secret this provider may send, for redaction of error texts."""
        return self.client_auth.secret_values()

    def _with_common(self, data: dict[str, str]) -> dict[str, str]:
        if self.scopes:
            data["scope"] = " ".join(self.scopes)
        if self.audience:
            data["audience"] = self.audience
        data.update(self.extra_params)
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}(client_id={self.client_id!r}, method={self.client_auth.method!r})"


class ClientCredentialsAuth(AuthProvider):
    """The client credentials grant (RFC 6749 4.4): a machine acting as itself."""

    grant_type = "client_credentials"

    def __init__(self, client_id: str, client_secret: str | None = None, **options: Unpack[ClientOptions]) -> None:
        if options.get("method") is None and options.get("private_key") is None:
            options["method"] = "client_secret_basic"
        self._init_client(client_id, client_secret, options)
        if self.client_auth.method == "none":
            raise ValueError("the client_credentials grant needs an authenticated client")

    def grant_data(self) -> dict[str, str]:
        return self._with_common({"grant_type": "client_credentials"})


class PasswordAuth(AuthProvider):
    """The resource owner password grant (RFC 6749 4.3), optionally with a TOTP code.

    ``totp_field`` names the form field for the code; ``totp`` is Keycloak's and
    this library's default, some servers use ``otp``.
    """

    grant_type = "password"

    def __init__(
        self,
        username: str,
        password: str,
        *,
        totp: str | Totp | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str | None = None,
        totp_field: str = "totp",
        **options: Unpack[ClientOptions],
    ) -> None:
        self.username = username
        self._password = password
        self.totp = Totp.parse(totp) if totp is not None else None
        self.totp_field = totp_field
        self._init_client(client_id, client_secret, options)

    def grant_data(self) -> dict[str, str]:
        data = {"grant_type": "password", "username": self.username, "password": self._password}
        if self.totp is not None:
            data[self.totp_field] = self.totp.current()
        return self._with_common(data)

    def secret_values(self) -> tuple[str, ...]:
        extra = self.totp.secret_values() if self.totp is not None else ()
        return (*super().secret_values(), self._password, *extra)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, username={self.username!r}, totp={self.totp is not None})"


class RefreshTokenAuth(AuthProvider):
    """Start from a refresh token obtained elsewhere (a bootstrap token).

    It cannot re-authenticate: when the refresh token chain breaks, the token
    managers raise :class:`~tokensync.auth.errors.ReauthenticationRequired`.
    """

    grant_type = "refresh_token"
    can_reauthenticate = False

    def __init__(
        self,
        refresh_token: str,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        self._refresh_token = refresh_token
        self._init_client(client_id, client_secret, options)

    def grant_data(self) -> dict[str, str]:
        data = {"grant_type": "refresh_token", "refresh_token": self._refresh_token}
        return self._with_common(data)

    def secret_values(self) -> tuple[str, ...]:
        return (*super().secret_values(), self._refresh_token)
