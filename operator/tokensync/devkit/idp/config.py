"""What the test identity provider serves: clients, users, lifetimes (a pydantic model).

Kept free of Django so a caller can build, validate and serialise a configuration
(the test fixtures write it to a JSON file for the subprocess) without paying for
the server.

Secrets are :class:`pydantic.SecretStr`, so ``repr()``, ``str()`` and a plain
``model_dump_json()`` mask them. The JSON config file needs the real values, so
:meth:`IdpConfig.to_json` asks for them explicitly (a serialisation context flag).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    SerializationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

__all__ = [
    "INTROSPECTOR_CLIENT_ID",
    "AuthMethod",
    "ClientConfig",
    "GrantType",
    "IdpConfig",
    "UserConfig",
]

GrantType = Literal["client_credentials", "password", "refresh_token"]
AuthMethod = Literal["client_secret_basic", "client_secret_post", "none", "private_key_jwt"]

#: A confidential client the server always registers for itself, with the admin token
#: as its secret, so :class:`~tokensync.devkit.idp.client.IdpAdmin` can call DOT's real
#: introspection endpoint without borrowing (and being broken by rotation of) a
#: configured client's secret.
INTROSPECTOR_CLIENT_ID = "tokensync-idp-introspector"

_REVEAL = "reveal_secrets"


def _reveal(value: SecretStr | None, info: SerializationInfo) -> str | None:
    """Serialise a secret as itself only when the caller asked for it by context."""
    if value is None:
        return None
    context = info.context
    if isinstance(context, Mapping) and context.get(_REVEAL):
        return value.get_secret_value()
    return str(value)  # the "**********" mask


class ClientConfig(BaseModel):
    """One OAuth2 client (a DOT ``Application``) and how it must authenticate.

    ``auth_method`` defaults from the other fields: a secret means
    ``client_secret_basic``, a public key means ``private_key_jwt``, neither means a
    public client (``none``). The secret methods accept both basic and post unless
    ``strict_auth_method`` is set, mirroring servers such as Keycloak; strict mode
    mirrors servers such as Okta that only honour the registered method.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = Field(min_length=1, max_length=200)
    client_secret: SecretStr | None = None
    grant_types: tuple[GrantType, ...] = ("client_credentials",)
    auth_method: AuthMethod = "client_secret_basic"
    public_key_pem: str | None = None
    strict_auth_method: bool = False

    @model_validator(mode="before")
    @classmethod
    def _default_auth_method(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("auth_method") is None:
            data = dict(data)
            if data.get("public_key_pem"):
                data["auth_method"] = "private_key_jwt"
            elif data.get("client_secret"):
                data["auth_method"] = "client_secret_basic"
            else:
                data["auth_method"] = "none"
        return data

    @field_validator("grant_types")
    @classmethod
    def _grant_types_usable(cls, value: tuple[GrantType, ...]) -> tuple[GrantType, ...]:
        if not {"client_credentials", "password"} & set(value):
            # refresh_token alone can never mint the first refresh token.
            raise ValueError("grant_types needs client_credentials or password")
        return tuple(dict.fromkeys(value))

    @field_validator("public_key_pem")
    @classmethod
    def _key_is_supported(cls, value: str | None) -> str | None:
        if value is not None:
            jwt_algorithm_for(value)  # raises ValueError when unusable
        return value

    @model_validator(mode="after")
    def _method_matches_credentials(self) -> ClientConfig:
        method = self.auth_method
        if method in ("client_secret_basic", "client_secret_post"):
            if self.client_secret is None or not self.client_secret.get_secret_value():
                raise ValueError(f"{self.client_id}: {method} needs a client_secret")
            if self.public_key_pem is not None:
                raise ValueError(f"{self.client_id}: public_key_pem is only for private_key_jwt")
        elif method == "private_key_jwt":
            if self.public_key_pem is None:
                raise ValueError(f"{self.client_id}: private_key_jwt needs public_key_pem")
            if self.client_secret is not None:
                raise ValueError(f"{self.client_id}: a private_key_jwt client has no secret")
        else:  # none: a public client
            if self.client_secret is not None or self.public_key_pem is not None:
                raise ValueError(f"{self.client_id}: a public client (none) has no credentials")
            if "client_credentials" in self.grant_types:
                raise ValueError(f"{self.client_id}: client_credentials needs an authenticated client")
        return self

    @field_serializer("client_secret")
    def _dump_secret(self, value: SecretStr | None, info: SerializationInfo) -> str | None:
        return _reveal(value, info)

    @property
    def is_public(self) -> bool:
        """RFC 6749 §2.1: a client that cannot hold credentials."""
        return self.auth_method == "none"

    def accepts(self, presented: AuthMethod) -> bool:
        """Whether a request authenticated by ``presented`` may speak for this client."""
        if presented == self.auth_method:
            return True
        secret_methods = ("client_secret_basic", "client_secret_post")
        return not self.strict_auth_method and presented in secret_methods and self.auth_method in secret_methods


class UserConfig(BaseModel):
    """A resource owner for the password grant; ``totp_seed`` (base32) adds a second factor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(min_length=1, max_length=150)
    password: SecretStr
    totp_seed: SecretStr | None = None

    @field_validator("totp_seed")
    @classmethod
    def _seed_is_base32(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            seed = value.get_secret_value()
            try:
                base64.b32decode(seed + "=" * (-len(seed) % 8), casefold=True)
            except (binascii.Error, ValueError):
                raise ValueError("totp_seed must be base32 (pyotp.random_base32())") from None
        return value

    @field_serializer("password", "totp_seed")
    def _dump_secret(self, value: SecretStr | None, info: SerializationInfo) -> str | None:
        return _reveal(value, info)


class IdpConfig(BaseModel):
    """Everything the identity provider serves; applied (upserted) on every start.

    Refresh tokens rotate by default, with DOT's reuse protection: presenting a
    refresh token that was already exchanged revokes its whole token family. Set
    ``rotate_refresh_tokens=False`` to imitate servers that hand the same refresh
    token back (reuse protection is meaningless then and is switched off with it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_token_lifetime: int = Field(default=3600, gt=0)
    #: Seconds a refresh token outlives its access token (DOT REFRESH_TOKEN_EXPIRE_SECONDS);
    #: ``None`` means refresh tokens never expire.
    refresh_token_lifetime: int | None = Field(default=None, gt=0)
    rotate_refresh_tokens: bool = True
    scopes: tuple[str, ...] = ("read", "write")
    clients: tuple[ClientConfig, ...] = ()
    users: tuple[UserConfig, ...] = ()

    @field_validator("scopes")
    @classmethod
    def _scopes_are_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one scope is needed")
        for scope in value:
            if not scope or any(ch.isspace() or ch in '"\\' for ch in scope):
                raise ValueError(f"not a scope token: {scope!r}")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _unique_names(self) -> IdpConfig:
        client_ids = [c.client_id for c in self.clients]
        if len(set(client_ids)) != len(client_ids):
            raise ValueError("client_id values must be unique")
        if INTROSPECTOR_CLIENT_ID in client_ids:
            raise ValueError(f"{INTROSPECTOR_CLIENT_ID} is reserved")
        usernames = [u.username for u in self.users]
        if len(set(usernames)) != len(usernames):
            raise ValueError("usernames must be unique")
        return self

    def client(self, client_id: str) -> ClientConfig:
        """The client named ``client_id``; ``KeyError`` if there is none."""
        for candidate in self.clients:
            if candidate.client_id == client_id:
                return candidate
        raise KeyError(client_id)

    def user(self, username: str) -> UserConfig:
        """The user named ``username``; ``KeyError`` if there is none."""
        for candidate in self.users:
            if candidate.username == username:
                return candidate
        raise KeyError(username)

    def with_changes(self, **changes: Any) -> IdpConfig:
        """A validated copy with some fields replaced (``model_copy`` would skip validation)."""
        return type(self).model_validate({**self.model_dump(context={_REVEAL: True}), **changes})

    def to_json(self) -> str:
        """The config file format, secrets included (write it somewhere private)."""
        return self.model_dump_json(context={_REVEAL: True})

    @classmethod
    def from_json(cls, text: str | bytes) -> IdpConfig:
        """Parse what :meth:`to_json` wrote (or a hand-written file)."""
        return cls.model_validate_json(text)


def jwt_algorithm_for(public_key_pem: str) -> Literal["RS256", "ES256"]:
    """The one JWS algorithm a client's registered key may sign with.

    Pinning the algorithm to the key type (never reading it from the assertion
    header) closes the classic algorithm-confusion holes.
    """
    try:
        key = load_pem_public_key(public_key_pem.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError("public_key_pem is not a PEM public key") from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError("RSA keys must have at least 2048 bits")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError("public_key_pem must be an RSA (RS256) or EC P-256 (ES256) public key")
