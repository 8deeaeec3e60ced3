"""How a client proves its identity to the token endpoint (RFC 6749 2.3, RFC 7523).

A :class:`ClientAuth` only edits the outgoing form and headers; it never sends
anything. That keeps every method testable without a server and lets the sync and
async managers share it. Secrets are held in fields excluded from ``repr``.
"""

from __future__ import annotations

import abc
import base64
import secrets
import time
from dataclasses import dataclass, field
from typing import ClassVar, Literal
from urllib.parse import quote

import jwt

__all__ = [
    "CLIENT_AUTH_METHODS",
    "ClientAuth",
    "ClientAuthMethod",
    "ClientSecretBasic",
    "ClientSecretPost",
    "PrivateKeyJWT",
    "PublicClient",
    "client_auth_for",
]

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post", "none", "private_key_jwt"]
CLIENT_AUTH_METHODS: tuple[ClientAuthMethod, ...] = (
    "client_secret_basic",
    "client_secret_post",
    "none",
    "private_key_jwt",
)
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class ClientAuth(abc.ABC):
    """Adds client authentication to one token request.

    Invariant: :meth:`apply` is called once per HTTP request, so methods that must
    never repeat a value (the ``jti`` of a client assertion) create it there.
    """

    method: ClassVar[ClientAuthMethod]
    client_id: str

    @abc.abstractmethod
    def apply(self, *, data: dict[str, str], headers: dict[str, str], token_url: str) -> None:
        """Edit the form ``data`` and ``headers`` of a request to ``token_url`` in place."""
        raise NotImplementedError

    def secret_values(self) -> tuple[str, ...]:
        """Values that must never appear in error texts (for :func:`errors.redact`)."""
        return ()


@dataclass(frozen=True)
class ClientSecretBasic(ClientAuth):
    """HTTP Basic with the form-urlencoded id and secret (RFC 6749 2.3.1); the default."""

    client_id: str
    client_secret: str = field(repr=False)
    method: ClassVar[ClientAuthMethod] = "client_secret_basic"

    def apply(self, *, data: dict[str, str], headers: dict[str, str], token_url: str) -> None:
        # RFC 6749 2.3.1: both parts are form-urlencoded *before* base64, which
        # matters for secrets with ':' or non-ASCII characters.
        pair = f"{quote(self.client_id, safe='')}:{quote(self.client_secret, safe='')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()

    def secret_values(self) -> tuple[str, ...]:
        return (self.client_secret,)


@dataclass(frozen=True)
class ClientSecretPost(ClientAuth):
    """The id and secret as form fields (RFC 6749 2.3.1, for servers without Basic)."""

    client_id: str
    client_secret: str = field(repr=False)
    method: ClassVar[ClientAuthMethod] = "client_secret_post"

    def apply(self, *, data: dict[str, str], headers: dict[str, str], token_url: str) -> None:
        data["client_id"] = self.client_id
        data["client_secret"] = self.client_secret

    def secret_values(self) -> tuple[str, ...]:
        return (self.client_secret,)


@dataclass(frozen=True)
class PublicClient(ClientAuth):
    """A public client (``none``): it identifies itself but cannot authenticate."""

    client_id: str
    method: ClassVar[ClientAuthMethod] = "none"

    def apply(self, *, data: dict[str, str], headers: dict[str, str], token_url: str) -> None:
        data["client_id"] = self.client_id


@dataclass(frozen=True)
class PrivateKeyJWT(ClientAuth):
    """A signed client assertion (RFC 7523 2.2, OIDC Core 9 ``private_key_jwt``).

    Each request gets a fresh ``jti`` and a short expiry, because servers keep a
    replay cache and reject a reused assertion. ``audience`` defaults to the token
    URL, which is what OIDC Core requires and what most servers accept.
    """

    client_id: str
    private_key: str = field(repr=False)
    algorithm: Literal["RS256", "ES256"] = "RS256"
    key_id: str | None = None
    audience: str | None = None
    lifetime: int = 60
    method: ClassVar[ClientAuthMethod] = "private_key_jwt"

    def __post_init__(self) -> None:
        # Check the key once, here: a bad key is a configuration error to report,
        # not something to discover (and retry) at every token request.
        try:
            jwt.get_algorithm_by_name(self.algorithm).prepare_key(self.private_key)
        except Exception:  # InvalidKeyError, ValueError, TypeError; never chained: no key in tracebacks
            raise ValueError(f"the private key is not a PEM key usable with {self.algorithm}") from None

    def apply(self, *, data: dict[str, str], headers: dict[str, str], token_url: str) -> None:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.audience or token_url,
            "jti": secrets.token_urlsafe(24),
            "iat": now,
            "exp": now + self.lifetime,
        }
        extra_headers = {"kid": self.key_id} if self.key_id else None
        data["client_assertion_type"] = JWT_BEARER_ASSERTION
        data["client_assertion"] = jwt.encode(claims, self.private_key, algorithm=self.algorithm, headers=extra_headers)
        data["client_id"] = self.client_id

    def secret_values(self) -> tuple[str, ...]:
        return (self.private_key,)


def client_auth_for(
    method: ClientAuthMethod | None,
    client_id: str,
    *,
    client_secret: str | None = None,
    private_key: str | None = None,
    signing_algorithm: Literal["RS256", "ES256"] = "RS256",
    key_id: str | None = None,
) -> ClientAuth:
    """Build the :class:`ClientAuth` for a method name, as configured in a CR or CLI.

    With ``method=None`` the choice follows what was given: a secret means
    ``client_secret_basic`` (RFC 6749's mandatory-to-implement method), a private
    key means ``private_key_jwt``, nothing means a public client.
    """
    if method is None:
        if private_key is not None:
            method = "private_key_jwt"
        elif client_secret is not None:
            method = "client_secret_basic"
        else:
            method = "none"
    match method:
        case "client_secret_basic" | "client_secret_post":
            if client_secret is None:
                raise ValueError(f"client authentication {method} needs a client secret")
            if method == "client_secret_basic":
                return ClientSecretBasic(client_id, client_secret)
            return ClientSecretPost(client_id, client_secret)
        case "private_key_jwt":
            if private_key is None:
                raise ValueError("client authentication private_key_jwt needs a private key")
            return PrivateKeyJWT(client_id, private_key, algorithm=signing_algorithm, key_id=key_id)
        case "none":
            return PublicClient(client_id)
