"""DOT's request validator, extended through its documented hook (``OAUTH2_VALIDATOR_CLASS``).

What this adds to :class:`oauth2_provider.oauth2_validators.OAuth2Validator`:

* ``private_key_jwt`` client authentication (RFC 7523 §2.2, OIDC Core §9), which DOT
  does not implement: a signed client assertion instead of a secret.
* The registered authentication method is enforced. DOT alone lets any client try
  both secret methods and lets a public client "authenticate" with an empty secret.
  Here a request carries exactly one method (RFC 6749 §2.3), and

  - ``client_secret_basic`` / ``client_secret_post`` clients may use either secret
    method (as Keycloak does), or only their own with ``strict_auth_method``;
  - ``private_key_jwt`` clients can only use an assertion, never a secret;
  - ``none`` (public) clients can only identify themselves (``client_id`` in the
    body, no secret); presenting any credential is rejected, and they can never pass
    ``authenticate_client`` (so they cannot introspect or use client_credentials).

* The configured grant types are enforced (DOT's ``Application`` holds a single
  grant type and implicitly allows ``refresh_token`` for it), and a client without
  ``refresh_token`` is not handed a refresh token at all.
* TOTP as a second factor of the password grant: a user with a seed must send a
  ``totp`` form field with a current code.

Everything else (token minting, rotation, reuse protection, storage) is DOT's own.
Django is imported at module level: this module is loaded by DOT after setup only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any, cast

import jwt
import pyotp
from oauth2_provider.models import get_refresh_token_model
from oauth2_provider.oauth2_validators import OAuth2Validator

from tokensync.devkit.idp.config import AuthMethod, jwt_algorithm_for
from tokensync.devkit.idp.state import STATE
from tokensync.devkit.idp.wire import JWT_BEARER_ASSERTION_TYPE, basic_client_id

__all__ = ["JWT_BEARER_ASSERTION_TYPE", "TokensyncValidator"]

log = logging.getLogger(__name__)

_TOTP_FORMAT = re.compile(r"\d{6}")
#: Clock skew tolerated on ``exp``/``iat``/``nbf`` of client assertions.
_LEEWAY_SECONDS = 5


def _param(request: Any, name: str) -> str | None:
    """A form parameter of an oauthlib request; ``None`` when absent or empty."""
    value = getattr(request, name, None)  # oauthlib exposes every form field as an attribute
    return value if isinstance(value, str) and value else None


class TokensyncValidator(OAuth2Validator):  # type: ignore[misc]  # DOT ships no type hints
    """DOT's validator plus private_key_jwt, auth-method policy, grant policy and TOTP."""

    # -- client authentication -------------------------------------------------------

    def client_authentication_required(self, request: Any, *args: Any, **kwargs: Any) -> bool:
        """An assertion is a credential, so its presence means "authenticate this client"."""
        if _param(request, "client_assertion") or _param(request, "client_assertion_type"):
            return True
        return bool(super().client_authentication_required(request, *args, **kwargs))

    def authenticate_client(self, request: Any, *args: Any, **kwargs: Any) -> bool:
        """Authenticate by exactly one method, and only by the one the client registered."""
        basic = self._extract_basic_auth(request)
        body_secret = _param(request, "client_secret")
        has_assertion = bool(_param(request, "client_assertion") or _param(request, "client_assertion_type"))
        if sum((basic is not None, body_secret is not None, has_assertion)) != 1:
            # No credentials (public clients go through authenticate_client_id), or
            # several at once, which RFC 6749 §2.3 forbids.
            return False
        if has_assertion:
            return self._authenticate_private_key_jwt(request)
        presented: AuthMethod
        if basic is not None:
            presented, client_id = "client_secret_basic", basic_client_id(basic)
            body_client_id = _param(request, "client_id")
            if body_client_id is not None and body_client_id != client_id:
                return False  # two identities in one request (oauthlib would answer 500)
        else:
            presented, client_id = "client_secret_post", _param(request, "client_id")
        policy = STATE.client(client_id)
        if policy is not None and not policy.accepts(presented):
            return False
        return bool(super().authenticate_client(request, *args, **kwargs))

    def authenticate_client_id(self, client_id: str, request: Any, *args: Any, **kwargs: Any) -> bool:
        """Identification without credentials: only for clients registered as ``none``."""
        policy = STATE.client(client_id)
        if policy is not None and not policy.is_public:
            return False
        return bool(super().authenticate_client_id(client_id, request, *args, **kwargs))

    def _authenticate_private_key_jwt(self, request: Any) -> bool:
        """RFC 7523 §3 checks on ``client_assertion``; the ``jti`` is spent only if all pass."""
        if _param(request, "client_assertion_type") != JWT_BEARER_ASSERTION_TYPE:
            return False
        assertion = _param(request, "client_assertion")
        if assertion is None:
            return False
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return False
        client_id = unverified.get("iss")
        if not isinstance(client_id, str) or not client_id:
            return False
        claimed = _param(request, "client_id")
        if claimed is not None and claimed != client_id:
            return False
        policy = STATE.client(client_id)
        if policy is None or policy.auth_method != "private_key_jwt" or policy.public_key_pem is None:
            return False
        try:
            claims = jwt.decode(
                assertion,
                key=policy.public_key_pem,
                algorithms=[jwt_algorithm_for(policy.public_key_pem)],
                audience=list(STATE.assertion_audiences),
                issuer=client_id,
                leeway=_LEEWAY_SECONDS,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.InvalidTokenError as exc:
            log.debug("client assertion of %s rejected: %s", client_id, type(exc).__name__)
            return False
        jti = claims.get("jti")
        if claims.get("sub") != client_id or not isinstance(jti, str) or not jti:
            return False
        if not STATE.replay_cache.remember(client_id, jti, float(claims["exp"]) + _LEEWAY_SECONDS):
            log.debug("client assertion of %s rejected: jti replayed", client_id)
            return False
        return self._load_application(client_id, request) is not None

    # -- grants ----------------------------------------------------------------------

    def validate_grant_type(
        self, client_id: str, grant_type: str, client: Any, request: Any, *args: Any, **kwargs: Any
    ) -> bool:
        """The configured grant types decide, not DOT's single ``authorization_grant_type``."""
        policy = STATE.client(cast(str, request.client.client_id))
        if policy is None:
            return bool(super().validate_grant_type(client_id, grant_type, client, request, *args, **kwargs))
        return grant_type in policy.grant_types

    def validate_refresh_token(self, refresh_token: str, client: Any, request: Any, *args: Any, **kwargs: Any) -> bool:
        """DOT's check, after counting a presentation of an already-spent refresh token.

        A refresh token whose every row is revoked was rotated away (or revoked): the
        client spends it a second time. Tests count these ("refresh tokens spent twice");
        DOT then applies reuse protection as usual.
        """
        checksum = hashlib.sha256(refresh_token.encode("utf-8")).hexdigest()
        rows = list(get_refresh_token_model().objects.filter(token_checksum=checksum).values_list("revoked", flat=True))
        if rows and all(revoked is not None for revoked in rows):
            STATE.count_reuse(str(getattr(client, "client_id", "") or ""))
        return bool(super().validate_refresh_token(refresh_token, client, request, *args, **kwargs))

    def save_bearer_token(self, token: dict[str, Any], request: Any, *args: Any, **kwargs: Any) -> Any:
        """Withhold refresh tokens from clients not registered for the refresh_token grant.

        oauthlib issues one for every password grant; ``token`` is also the response
        body, so dropping it here drops it from the response.
        """
        policy = STATE.client(cast(str, request.client.client_id))
        if policy is not None and "refresh_token" not in policy.grant_types:
            token.pop("refresh_token", None)
        return super().save_bearer_token(token, request, *args, **kwargs)

    def validate_user(self, username: str, password: str, client: Any, request: Any, *args: Any, **kwargs: Any) -> bool:
        """Password first (DOT), then the TOTP code for users with a seed.

        ``valid_window=1`` accepts the previous and next 30 s step, as most servers do.
        Codes are not single-use here (RFC 6238 §5.2 says they should be); tests log
        in repeatedly within one step, and a second factor is not what is under test.
        """
        if not super().validate_user(username, password, client, request, *args, **kwargs):
            return False
        seed = STATE.totp_seed(username)
        if seed is None:
            return True
        code = _param(request, "totp")
        if code is None or not _TOTP_FORMAT.fullmatch(code) or not pyotp.TOTP(seed).verify(code, valid_window=1):
            request.user = None
            return False
        return True
