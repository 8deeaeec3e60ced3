"""The ``OAuthCredential`` custom resource, as pydantic models.

These models are the single source of truth: the CRD in ``crds/`` is generated
from them (``tokensync crd``, :mod:`tokensync.models.crd`), and the operator
validates every body with them once, at the handler edge. Rules that the API
server can check (enums, patterns, CEL ``x-kubernetes-validations``) are declared
here next to the Python validators that enforce the same rule with the same
message, because the API server is not the only way a spec arrives (``tokensync
token -f``, API emulators, clusters that skip CEL).

GitOps: nothing here has a server-side default. Defaults live in code (the
``effective_*`` helpers), so the operator never has a reason to write a default
back into ``spec`` and Argo CD / Flux never see a diff they did not make.

Secret values never go into a spec: only :class:`SecretKeyRef` references to
Secrets in the resource's own namespace. Kopf-style diff annotations copy the
spec around; a spec without secrets is safe to copy.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "ClientAuthMethod",
    "Condition",
    "CredentialSpec",
    "CredentialStatus",
    "DeletionPolicy",
    "GrantSpec",
    "GrantType",
    "IssuerSpec",
    "OAuthCredential",
    "RefreshSpec",
    "SecretKeyRef",
    "StoreBackend",
    "StoreSpec",
    "TargetSpec",
    "parse_duration",
]

GROUP = "tokensync.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "OAuthCredential"
PLURAL = "oauthcredentials"

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# RFC 1123 subdomain, what Kubernetes accepts as a Secret name.
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
URL_PATTERN = r"^https?://[^\s/$.?#][^\s]*$"


def parse_duration(value: str) -> timedelta:
    """Parse a Go-style duration (``90s``, ``5m``, ``1h30m``), as cert-manager does."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"{value!r} is not a duration like 30s, 5m or 1h30m")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in _DURATION_PART.findall(value)))


Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]


class _Model(BaseModel):
    """Strict about unknown fields: a typo in a spec must be an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class GrantType(StrEnum):
    CLIENT_CREDENTIALS = "client_credentials"
    PASSWORD = "password"
    REFRESH_TOKEN = "refresh_token"


class ClientAuthMethod(StrEnum):
    CLIENT_SECRET_BASIC = "client_secret_basic"
    CLIENT_SECRET_POST = "client_secret_post"
    NONE = "none"
    PRIVATE_KEY_JWT = "private_key_jwt"


class DeletionPolicy(StrEnum):
    DELETE = "Delete"
    RETAIN = "Retain"


class StoreBackend(StrEnum):
    SECRET = "secret"
    REDIS = "redis"


class SecretKeyRef(_Model):
    """A key of a Secret in the resource's own namespace (no namespace field on purpose)."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=SECRET_NAME_PATTERN,
        description="The Secret's name, in the same namespace.",
    )
    key: str = Field(
        min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN, description="The key within the Secret's data."
    )


class IssuerSpec(_Model):
    """Where tokens come from: a token URL, or an OIDC issuer to discover it from."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.tokenURL) != has(self.issuerURL)",
                    "message": "set exactly one of issuer.tokenURL or issuer.issuerURL",
                }
            ]
        }
    )

    token_url: str | None = Field(
        default=None,
        alias="tokenURL",
        max_length=2048,
        pattern=URL_PATTERN,
        description="The OAuth2 token endpoint (RFC 6749 3.2).",
    )
    issuer_url: str | None = Field(
        default=None,
        alias="issuerURL",
        max_length=2048,
        pattern=URL_PATTERN,
        description="An OpenID Connect issuer; the token endpoint is discovered from its metadata.",
    )
    ca_secret_ref: SecretKeyRef | None = Field(
        default=None,
        alias="caSecretRef",
        description="A PEM CA bundle to trust for the issuer instead of the system roots.",
    )
    timeout: Duration | None = Field(default=None, description="Timeout of one token request, like 10s (the default).")

    @model_validator(mode="after")
    def _one_url(self) -> IssuerSpec:
        if (self.token_url is None) == (self.issuer_url is None):
            raise ValueError("set exactly one of issuer.tokenURL or issuer.issuerURL")
        return self

    def effective_timeout(self) -> float:
        return parse_duration(self.timeout).total_seconds() if self.timeout else 10.0


class GrantSpec(_Model):
    """Which grant, which client, and references to the Secrets holding its credentials."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.type != 'password' || (has(self.usernameRef) && has(self.passwordRef))",
                    "message": "grant.type password needs grant.usernameRef and grant.passwordRef",
                },
                {
                    "rule": "self.type != 'refresh_token' || has(self.refreshTokenRef)",
                    "message": "grant.type refresh_token needs grant.refreshTokenRef",
                },
                {
                    "rule": "self.type != 'client_credentials' || has(self.clientSecretRef) || has(self.privateKeyRef)",
                    "message": "grant.type client_credentials needs grant.clientSecretRef or grant.privateKeyRef",
                },
                {
                    "rule": "!has(self.clientAuthMethod) || self.clientAuthMethod != 'private_key_jwt' "
                    "|| has(self.privateKeyRef)",
                    "message": "grant.clientAuthMethod private_key_jwt needs grant.privateKeyRef",
                },
                {
                    "rule": "!has(self.clientAuthMethod) || !(self.clientAuthMethod in "
                    "['client_secret_basic', 'client_secret_post']) || has(self.clientSecretRef)",
                    "message": "grant.clientAuthMethod client_secret_* needs grant.clientSecretRef",
                },
            ]
        }
    )

    type: GrantType = Field(description="The OAuth2 grant that obtains tokens.")
    client_id: str = Field(alias="clientID", min_length=1, max_length=512, description="The OAuth2 client_id.")
    client_secret_ref: SecretKeyRef | None = Field(
        default=None, alias="clientSecretRef", description="The client secret, for confidential clients."
    )
    client_auth_method: ClientAuthMethod | None = Field(
        default=None,
        alias="clientAuthMethod",
        description="How the client authenticates to the token endpoint. Default: private_key_jwt with a "
        "privateKeyRef, else client_secret_basic with a clientSecretRef, else none (a public client).",
    )
    private_key_ref: SecretKeyRef | None = Field(
        default=None, alias="privateKeyRef", description="A PEM private key that signs private_key_jwt assertions."
    )
    signing_algorithm: Literal["RS256", "ES256"] | None = Field(
        default=None, alias="signingAlgorithm", description="The private_key_jwt signing algorithm (default RS256)."
    )
    key_id: str | None = Field(
        default=None, alias="keyID", max_length=256, description="The kid header of private_key_jwt assertions."
    )
    username_ref: SecretKeyRef | None = Field(
        default=None, alias="usernameRef", description="The resource owner's username (password grant)."
    )
    password_ref: SecretKeyRef | None = Field(
        default=None, alias="passwordRef", description="The resource owner's password (password grant)."
    )
    totp_secret_ref: SecretKeyRef | None = Field(
        default=None,
        alias="totpSecretRef",
        description="A base32 TOTP seed; a current one-time code is sent with the password grant.",
    )
    refresh_token_ref: SecretKeyRef | None = Field(
        default=None,
        alias="refreshTokenRef",
        description="The initial refresh token (refresh_token grant); rotated tokens are kept in the store.",
    )
    scopes: list[Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[!#-\[\]-~]+$")]] | None = Field(
        default=None, max_length=64, description="Scopes to request."
    )
    audience: str | None = Field(default=None, max_length=1024, description="The audience parameter to send, if any.")
    extra_params: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        alias="extraParams",
        max_length=32,
        description="Extra form parameters for the token request; standard parameters cannot be overridden.",
    )

    @model_validator(mode="after")
    def _references_fit_the_grant(self) -> GrantSpec:
        if self.type == GrantType.PASSWORD and (self.username_ref is None or self.password_ref is None):
            raise ValueError("grant.type password needs grant.usernameRef and grant.passwordRef")
        if self.type == GrantType.REFRESH_TOKEN and self.refresh_token_ref is None:
            raise ValueError("grant.type refresh_token needs grant.refreshTokenRef")
        if (
            self.type == GrantType.CLIENT_CREDENTIALS
            and self.client_secret_ref is None
            and self.private_key_ref is None
        ):
            raise ValueError("grant.type client_credentials needs grant.clientSecretRef or grant.privateKeyRef")
        if self.client_auth_method == ClientAuthMethod.PRIVATE_KEY_JWT and self.private_key_ref is None:
            raise ValueError("grant.clientAuthMethod private_key_jwt needs grant.privateKeyRef")
        if (
            self.client_auth_method in (ClientAuthMethod.CLIENT_SECRET_BASIC, ClientAuthMethod.CLIENT_SECRET_POST)
            and self.client_secret_ref is None
        ):
            raise ValueError("grant.clientAuthMethod client_secret_* needs grant.clientSecretRef")
        if self.extra_params:
            reserved = {"grant_type", "client_id", "client_secret", "username", "password", "refresh_token",
                        "client_assertion", "client_assertion_type", "scope", "audience"}  # fmt: skip
            clash = sorted(set(self.extra_params) & reserved)
            if clash:
                raise ValueError(f"grant.extraParams may not set {', '.join(clash)}")
        return self

    def references(self) -> dict[str, SecretKeyRef]:
        """Every Secret reference, by the spec path that names it (for error messages)."""
        refs = {
            "grant.clientSecretRef": self.client_secret_ref,
            "grant.privateKeyRef": self.private_key_ref,
            "grant.usernameRef": self.username_ref,
            "grant.passwordRef": self.password_ref,
            "grant.totpSecretRef": self.totp_secret_ref,
            "grant.refreshTokenRef": self.refresh_token_ref,
        }
        return {path: ref for path, ref in refs.items() if ref is not None}


class RefreshSpec(_Model):
    """When to renew. Default: at 80% of the issued lifetime, at least 2 minutes before expiry."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.renewBefore) && has(self.renewBeforePercentage))",
                    "message": "set at most one of refresh.renewBefore or refresh.renewBeforePercentage",
                }
            ]
        }
    )

    renew_before: Duration | None = Field(
        default=None, alias="renewBefore", description="Renew this long before the access token expires, like 5m."
    )
    renew_before_percentage: int | None = Field(
        default=None,
        alias="renewBeforePercentage",
        ge=1,
        le=99,
        description="Renew when this percentage of the issued lifetime is left.",
    )
    min_interval: Duration | None = Field(
        default=None, alias="minInterval", description="The least time between two refreshes (default 10s)."
    )

    @model_validator(mode="after")
    def _one_rule(self) -> RefreshSpec:
        if self.renew_before is not None and self.renew_before_percentage is not None:
            raise ValueError("set at most one of refresh.renewBefore or refresh.renewBeforePercentage")
        return self

    def effective_min_interval(self) -> float:
        return parse_duration(self.min_interval).total_seconds() if self.min_interval else 10.0


class TargetSpec(_Model):
    """The Secret that workloads mount."""

    secret_name: str | None = Field(
        default=None,
        alias="secretName",
        max_length=253,
        pattern=SECRET_NAME_PATTERN,
        description="The name of the Secret to write.",
    )
    type: str | None = Field(
        default=None, max_length=253, pattern=r"^[-._a-zA-Z0-9/]+$", description="The Secret's type (default Opaque)."
    )
    labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=64, description="Labels to put on the Secret."
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, max_length=64, description="Annotations to put on the Secret."
    )
    template: dict[str, Annotated[str, Field(max_length=16384)]] | None = Field(
        default=None,
        max_length=32,
        description="Secret keys rendered from templates over token fields, like {{ token_type }} {{ access_token }}.",
    )
    deletion_policy: DeletionPolicy | None = Field(
        default=None, alias="deletionPolicy", description="What happens to the Secret when the resource is deleted."
    )

    @field_validator("template")
    @classmethod
    def _template_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key in value or {}:
            if not re.fullmatch(SECRET_KEY_PATTERN, key) or len(key) > 253:
                raise ValueError(f"target.template key {key!r} is not a valid Secret key")
        return value

    @field_validator("labels", "annotations")
    @classmethod
    def _no_reserved(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key in value or {}:
            if key.startswith("tokensync.dev/") or key == "app.kubernetes.io/managed-by":
                raise ValueError(f"{key!r} is reserved for tokensync")
        return value


class StoreSpec(_Model):
    """Where the full token set (refresh token included) is kept. Connection details are
    operator settings, never part of a resource: a tenant must not point the operator
    at an arbitrary Redis."""

    backend: StoreBackend | None = Field(
        default=None, description="The store backend (default: the operator's setting)."
    )


class CredentialSpec(_Model):
    """How to obtain an OAuth2 access token, and the Secret to keep it fresh in."""

    issuer: IssuerSpec
    grant: GrantSpec
    refresh: RefreshSpec | None = None
    target: TargetSpec | None = None
    store: StoreSpec | None = None

    def effective_refresh(self) -> RefreshSpec:
        return self.refresh or RefreshSpec()

    def effective_target(self) -> TargetSpec:
        return self.target or TargetSpec()

    def effective_backend(self, default: StoreBackend = StoreBackend.SECRET) -> StoreBackend:
        return (self.store.backend if self.store else None) or default


class Condition(BaseModel):
    """A kstatus condition (``metav1.Condition``)."""

    model_config = ConfigDict(populate_by_name=True)

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: datetime = Field(alias="lastTransitionTime")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")


class CredentialStatus(BaseModel):
    """What users, ``kubectl wait``, Flux and Argo CD read. No secret, ever."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    conditions: list[Condition] = Field(default_factory=list)
    secret_name: str | None = Field(default=None, alias="secretName")
    expires_at: datetime | None = Field(default=None, alias="expiresAt")
    refresh_token_expires_at: datetime | None = Field(default=None, alias="refreshTokenExpiresAt")
    last_refresh_time: datetime | None = Field(default=None, alias="lastRefreshTime")
    next_refresh_time: datetime | None = Field(default=None, alias="nextRefreshTime")
    failed_attempts: int | None = Field(default=None, alias="failedAttempts")
    last_failure_time: datetime | None = Field(default=None, alias="lastFailureTime")
    granted_scopes: list[str] | None = Field(default=None, alias="grantedScopes")
    refresh_count: int | None = Field(default=None, alias="refreshCount")
    handled_refresh_request: str | None = Field(default=None, alias="handledRefreshRequest")


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    deletion_timestamp: str | None = Field(default=None, alias="deletionTimestamp")


class OAuthCredential(BaseModel):
    """A whole resource body: validated once at the handler edge, then passed inward."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    api_version: Literal["tokensync.dev/v1alpha1"] = Field(default="tokensync.dev/v1alpha1", alias="apiVersion")
    kind: Literal["OAuthCredential"] = "OAuthCredential"
    metadata: ObjectMeta
    spec: CredentialSpec
    status: CredentialStatus | None = None
