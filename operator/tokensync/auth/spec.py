"""From an OAuthCredential spec plus the values it references, to a grant provider.

Shared by the operator (values from Kubernetes Secrets) and ``tokensync token``
(values from files, flags or the environment), so that a credential means the
same thing wherever it runs. Values are keyed by the spec path that references
them (``"grant.clientSecretRef"``), which is also how errors name them.
Nothing here knows where the values came from.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from tokensync.auth.providers import AuthProvider, ClientCredentialsAuth, PasswordAuth, RefreshTokenAuth, Totp
from tokensync.models.credential import CredentialSpec, GrantSpec, GrantType, IssuerSpec, SecretKeyRef

__all__ = [
    "insecure_url_problem",
    "is_loopback",
    "normalise_secret_value",
    "policy_problem",
    "provider_from_spec",
    "spec_references",
    "ssl_context_for_ca",
    "url_allowed",
]


def spec_references(spec: CredentialSpec) -> dict[str, SecretKeyRef]:
    """Every Secret key the spec references, by spec path (the CA bundle included)."""
    refs = dict(spec.grant.references())
    if spec.issuer.ca_secret_ref is not None:
        refs["issuer.caSecretRef"] = spec.issuer.ca_secret_ref
    return refs


def normalise_secret_value(value: str) -> str:
    """Drop the trailing newline ``kubectl create secret --from-file`` keeps.

    No server expects it in a password or client secret; PEM blocks keep theirs.
    """
    return value if value.lstrip().startswith("-----BEGIN") else value.rstrip("\r\n")


def provider_from_spec(grant: GrantSpec, values: Mapping[str, str]) -> AuthProvider:
    """The provider for a grant spec; raises ``ValueError`` naming the problem, never a value."""
    common: dict[str, Any] = {
        "method": grant.client_auth_method.value if grant.client_auth_method else None,
        "private_key": values.get("grant.privateKeyRef"),
        "signing_algorithm": grant.signing_algorithm or "RS256",
        "key_id": grant.key_id,
        "scopes": grant.scopes or (),
        "audience": grant.audience,
        "extra_params": grant.extra_params,
    }
    secret = values.get("grant.clientSecretRef")
    try:
        match grant.type:
            case GrantType.CLIENT_CREDENTIALS:
                return ClientCredentialsAuth(grant.client_id, secret, **common)
            case GrantType.PASSWORD:
                seed = values.get("grant.totpSecretRef")
                return PasswordAuth(
                    values["grant.usernameRef"],
                    values["grant.passwordRef"],
                    totp=Totp(seed=seed.replace(" ", "")) if seed else None,
                    client_id=grant.client_id,
                    client_secret=secret,
                    **common,
                )
            case GrantType.REFRESH_TOKEN:
                return RefreshTokenAuth(
                    values["grant.refreshTokenRef"], client_id=grant.client_id, client_secret=secret, **common
                )
    except KeyError as exc:
        raise ValueError(f"grant: no value for {exc.args[0]}") from None
    except ValueError as exc:
        raise ValueError(f"grant: {exc}") from None


def is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_url_problem(issuer: IssuerSpec, *, allow_insecure_http: bool) -> str | None:
    """Why the issuer URLs are refused, or None: plain http only to loopback unless allowed,
    because the client secret or password travels in that request."""
    for path, url in (("issuer.tokenURL", issuer.token_url), ("issuer.issuerURL", issuer.issuer_url)):
        if url is None:
            continue
        parts = urlsplit(url)
        if parts.scheme == "http" and not allow_insecure_http and not is_loopback(parts.hostname):
            return f"{path} uses plain http; use https (or allow insecure http explicitly)"
    return None


def url_allowed(url: str, prefixes: Sequence[str]) -> bool:
    """Whether ``url`` starts with one of ``prefixes`` (an empty list allows everything).

    Compared after normalising scheme and host case, and only at a path boundary, so
    that ``https://idp.example.com`` does not admit ``https://idp.example.com.evil.io``.
    """
    if not prefixes:
        return True
    candidate = _normalised(url)
    for prefix in prefixes:
        base = _normalised(prefix)
        if candidate == base or candidate.startswith(base if base.endswith("/") else base + "/"):
            return True
    return False


def _normalised(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path}"


def policy_problem(path: str, url: str, prefixes: Sequence[str]) -> str | None:
    """Why the operator's URL policy refuses ``url`` (named by its spec path), or None."""
    if url_allowed(url, prefixes):
        return None
    return f"{path} {url} is not allowed by the operator's URL policy (allowed prefixes: {', '.join(prefixes)})"


def ssl_context_for_ca(ca_pem: str) -> ssl.SSLContext:
    """A client TLS context trusting exactly this PEM bundle; ``ValueError`` when it is not one."""
    try:
        return ssl.create_default_context(cadata=ca_pem)
    except (ssl.SSLError, ValueError):
        raise ValueError("issuer.caSecretRef: the CA bundle is not valid PEM") from None
