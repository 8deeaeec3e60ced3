"""The Django settings of the identity provider, built in code for ``settings.configure()``.

There is no Django project on disk: the IdP is a library function, and everything
that varies per run (port, state directory, lifetimes) is known only at start. This
module builds a plain dict and imports nothing from Django.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from tokensync.devkit.idp.config import IdpConfig

__all__ = ["ADMIN_TOKEN_SETTING", "OAUTH_PREFIX", "TOKEN_PATH", "build_settings"]

#: Where DOT's views are mounted; the OIDC issuer is ``<url>/o``.
OAUTH_PREFIX = "/o"
TOKEN_PATH = f"{OAUTH_PREFIX}/token/"

#: The Django setting holding the ``/admin-test/`` bearer token (random per start).
ADMIN_TOKEN_SETTING = "TOKENSYNC_IDP_ADMIN_TOKEN"

_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", "none"]


def build_settings(
    config: IdpConfig,
    *,
    base_url: str,
    state_dir: Path,
    oidc_private_key_pem: str,
    admin_token: str,
) -> dict[str, Any]:
    """Settings for one IdP serving ``base_url`` with its database under ``state_dir``."""
    issuer = base_url + OAUTH_PREFIX
    return {
        "DEBUG": False,
        ADMIN_TOKEN_SETTING: admin_token,
        # Signs nothing we rely on (no sessions, no CSRF cookies); random per run.
        "SECRET_KEY": secrets.token_urlsafe(48),
        "ALLOWED_HOSTS": ["127.0.0.1", "localhost"],
        "ROOT_URLCONF": "tokensync.devkit.idp.urls",
        "INSTALLED_APPS": [
            "django.contrib.contenttypes",
            "django.contrib.auth",
            "oauth2_provider",
        ],
        "MIDDLEWARE": ["tokensync.devkit.idp.middleware.TokenRequestCounter"],
        "DATABASES": {
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(state_dir / "idp.sqlite3"),
                "OPTIONS": {
                    # The server is threaded and SQLite has one writer: take the write
                    # lock when a transaction starts (no deadlock-on-upgrade "database is
                    # locked" errors) and wait for it instead of failing.
                    "transaction_mode": "IMMEDIATE",
                    "timeout": 30,
                },
            }
        },
        "DEFAULT_AUTO_FIELD": "django.db.models.BigAutoField",
        "USE_TZ": True,
        "TIME_ZONE": "UTC",
        # A test IdP: PBKDF2's deliberate ~0.4 s of CPU per password check would make
        # every password grant slow and let CPU contention, not tokensync, decide test
        # timings. MD5 is worthless for real passwords, which is fine for fixtures.
        "PASSWORD_HASHERS": ["django.contrib.auth.hashers.MD5PasswordHasher"],
        "AUTH_PASSWORD_VALIDATORS": [],
        "OAUTH2_PROVIDER": {
            "OAUTH2_VALIDATOR_CLASS": "tokensync.devkit.idp.validator.TokensyncValidator",
            "ACCESS_TOKEN_EXPIRE_SECONDS": config.access_token_lifetime,
            "REFRESH_TOKEN_EXPIRE_SECONDS": config.refresh_token_lifetime,
            "ROTATE_REFRESH_TOKEN": config.rotate_refresh_tokens,
            # Presenting an already-rotated refresh token revokes its whole family
            # (every refresh token and access token descended from the same grant).
            "REFRESH_TOKEN_REUSE_PROTECTION": config.rotate_refresh_tokens,
            # No grace window: a rotated refresh token is dead at once, so a client that
            # loses the race (or retries blindly) sees invalid_grant, as with strict IdPs.
            "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
            "SCOPES": {scope: scope for scope in config.scopes},
            "DEFAULT_SCOPES": ["__all__"],
            "OIDC_ENABLED": True,
            "OIDC_RSA_PRIVATE_KEY": oidc_private_key_pem,
            # Pinned rather than derived from the Host header, so the issuer and the
            # advertised token_endpoint are the same whatever name a client dials.
            "OIDC_ISS_ENDPOINT": issuer,
            "OIDC_TOKEN_ENDPOINT_AUTH_METHODS_SUPPORTED": _AUTH_METHODS,
            "OAUTH2_TOKEN_ENDPOINT_AUTH_METHODS_SUPPORTED": _AUTH_METHODS,
            "OAUTH2_GRANT_TYPES_SUPPORTED": ["password", "client_credentials", "refresh_token"],
        },
        "LOGGING": {
            "version": 1,
            "disable_existing_loggers": False,
            "handlers": {
                "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"},
                "null": {"class": "logging.NullHandler"},
            },
            "loggers": {
                # One line per request is noise in test output; errors still surface below.
                "django.server": {"handlers": ["null"], "level": "CRITICAL", "propagate": False},
                # 500s with tracebacks (never request bodies); 4xx are expected in tests.
                "django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
                # DOT warns on every password grant (RFC 9700 discourages it); tokensync
                # supports that grant deliberately, so only errors are worth showing.
                "oauth2_provider": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
            },
        },
    }
