"""Operator settings: environment (``TOKENSYNC_*``), flags, or a mounted file.

Everything a tenant must not control lives here rather than in the custom
resource: the Redis URL and password, the encryption key, which token URLs are
allowed. pydantic-settings reads them (and ``*_FILE`` style secrets through
``secrets_dir``) so the same model serves the CLI, the Deployment and tests.
"""

from __future__ import annotations

import base64
import binascii
import os
import socket

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokensync.models.credential import StoreBackend

__all__ = ["OperatorSettings"]


class OperatorSettings(BaseSettings):
    # hide_input_in_errors: a validation error must not quote a Redis URL, password or key.
    model_config = SettingsConfigDict(
        env_prefix="TOKENSYNC_", env_nested_delimiter="__", extra="ignore", hide_input_in_errors=True
    )

    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty means the whole cluster."
    )
    default_store: StoreBackend = Field(default=StoreBackend.SECRET, description="Store for CRs that name none.")
    redis_url: SecretStr | None = Field(default=None, description="redis:// or rediss:// URL of the Redis store.")
    redis_encryption_key: SecretStr | None = Field(
        default=None, description="base64 of 32 random bytes: seal Redis payloads with AES-256-GCM."
    )
    redis_key_prefix: str = Field(default="tokensync:", description="Prefix of every Redis key.")
    concurrency: int = Field(default=32, ge=1, le=1024, description="Credentials renewed at the same time.")
    endpoint_concurrency: int = Field(
        default=8, ge=1, le=1024, description="Token requests in flight at once, per token endpoint host."
    )
    endpoint_rate: float = Field(
        default=20.0, gt=0, description="Average token requests per second, per token endpoint host."
    )
    endpoint_burst: int = Field(default=40, ge=1, description="Token requests allowed at once above the rate.")
    expiry_skew: float = Field(default=5.0, ge=0, description="Seconds before expiry a token counts as expired.")
    jitter_fraction: float = Field(default=0.05, ge=0, le=0.5, description="Spread of refresh times.")
    backoff_initial: float = Field(default=5.0, gt=0, description="First retry delay after a transient failure.")
    backoff_max: float = Field(default=300.0, gt=0, description="Longest retry delay.")
    allow_insecure_http: bool = Field(
        default=False, description="Allow plain http:// token URLs on non-loopback hosts."
    )
    allowed_url_prefixes: list[str] = Field(
        default_factory=list,
        description="Token and issuer URLs must start with one of these (empty: any). Guards against the "
        "operator being used as an SSRF proxy into the cluster network.",
    )
    namespace_url_prefixes: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per-namespace allowed URL prefixes (JSON), replacing allowed_url_prefixes there.",
    )
    metrics_port: int = Field(default=9090, ge=0, le=65535, description="Prometheus metrics port; 0 disables.")
    metrics_address: str = Field(default="0.0.0.0", description="Address the metrics endpoint binds to.")  # noqa: S104
    discovery_ttl: float = Field(default=3600.0, gt=0, description="How long an OIDC discovery document is cached.")
    identity: str = Field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}",
        min_length=1,
        max_length=253,
        description="Who holds a credential's lease while refreshing it. Distinct for every process that runs at "
        "the same time; the same after a restart lets a process take back the leases it held when it died "
        "(in a pod the default, hostname and PID 1, is both).",
    )
    lease_ttl: float = Field(
        default=30.0,
        ge=5.0,
        le=600.0,
        description="Seconds a refresh lease lasts: longer than a token request can take, so a live holder never "
        "loses it; a crashed holder blocks others at most this long.",
    )

    @field_validator("redis_encryption_key")
    @classmethod
    def _key_is_32_bytes(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            key = base64.b64decode(value.get_secret_value(), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            raise ValueError("must be base64 of 32 random bytes (e.g. `openssl rand -base64 32`)")
        return value

    def url_prefixes_for(self, namespace: str) -> list[str]:
        return self.namespace_url_prefixes.get(namespace, self.allowed_url_prefixes)
