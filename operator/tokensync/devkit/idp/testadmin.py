"""``/admin-test/``: endpoints that let a test change the IdP's world under tokensync.

These only mutate state (passwords, client secrets, tokens, counters); they never
issue tokens, which stays DOT's job. JSON in, JSON out. Every call needs
``Authorization: Bearer <admin token>``: the server binds loopback only, but on a
shared machine loopback is not private, and resetting a password is the kind of
thing one other local user should not be able to do to a demo.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from oauth2_provider.models import get_access_token_model, get_application_model, get_refresh_token_model

from tokensync.devkit.idp.settings import ADMIN_TOKEN_SETTING
from tokensync.devkit.idp.state import STATE

__all__ = ["urlpatterns"]

View = Callable[..., HttpResponse]


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def _admin_only(method: str) -> Callable[[View], View]:
    """Check the HTTP method and the admin bearer token, then parse the JSON body."""

    def decorate(view: View) -> View:
        def wrapped(request: HttpRequest, **kwargs: Any) -> HttpResponse:
            if request.method != method:
                return _error(405, f"use {method}")
            expected = str(getattr(settings, ADMIN_TOKEN_SETTING))
            scheme, _, presented = str(request.headers.get("Authorization", "")).partition(" ")
            if scheme != "Bearer" or not secrets.compare_digest(presented.encode(), expected.encode()):
                return _error(401, "admin token required")
            body: dict[str, Any] = {}
            if request.body:
                try:
                    parsed = json.loads(request.body)
                except ValueError:
                    return _error(400, "body must be JSON")
                if not isinstance(parsed, dict):
                    return _error(400, "body must be a JSON object")
                body = parsed
            return view(request, body, **kwargs)

        return wrapped

    return decorate


def _string_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    return value if isinstance(value, str) and value else None


@_admin_only("POST")
def set_password(request: HttpRequest, body: dict[str, Any], username: str) -> HttpResponse:
    """``{"password": "..."}``: the user's next password grant needs the new password."""
    password = _string_field(body, "password")
    if password is None:
        return _error(400, "password required")
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        return _error(404, "no such user")
    user.set_password(password)
    user.save(update_fields=["password"])
    return JsonResponse({"username": username})


@_admin_only("POST")
def rotate_client_secret(request: HttpRequest, body: dict[str, Any], client_id: str) -> HttpResponse:
    """``{"client_secret": "..."}``: the old secret stops working at once (no overlap)."""
    new_secret = _string_field(body, "client_secret")
    if new_secret is None:
        return _error(400, "client_secret required")
    policy = STATE.client(client_id)
    if policy is not None and policy.auth_method not in ("client_secret_basic", "client_secret_post"):
        return _error(409, f"{client_id} does not authenticate with a secret")
    application = get_application_model().objects.filter(client_id=client_id).first()
    if application is None:
        return _error(404, "no such client")
    application.client_secret = new_secret
    application.hash_client_secret = False
    application.save(update_fields=["client_secret", "hash_client_secret", "updated"])
    return JsonResponse({"client_id": client_id})


@_admin_only("POST")
def revoke_client_tokens(request: HttpRequest, body: dict[str, Any], client_id: str) -> HttpResponse:
    """Revoke every access and refresh token of a client, as an IdP-side logout would."""
    application = get_application_model().objects.filter(client_id=client_id).first()
    if application is None:
        return _error(404, "no such client")
    refresh_tokens = get_refresh_token_model().objects.filter(application=application, revoked__isnull=True)
    access_tokens = get_access_token_model().objects.filter(application=application)
    with transaction.atomic():
        access_count = access_tokens.count()
        refresh_count = 0
        for refresh_token in refresh_tokens:
            refresh_token.revoke()  # DOT's own revocation: marks it, deletes its access token
            refresh_count += 1
        access_tokens.delete()  # the rest: client_credentials tokens have no refresh token
    return JsonResponse({"client_id": client_id, "refresh_tokens": refresh_count, "access_tokens": access_count})


@_admin_only("GET")
def counters(request: HttpRequest, body: dict[str, Any]) -> HttpResponse:
    """Token-endpoint requests served so far, one row per (client_id, grant_type, status),
    and presentations of already-spent refresh tokens, one row per client."""
    rows = [
        {"client_id": key.client_id, "grant_type": key.grant_type, "status": key.status, "count": count}
        for key, count in sorted(STATE.counts().items(), key=lambda item: repr(item[0]))
    ]
    reused = [{"client_id": client_id, "count": count} for client_id, count in sorted(STATE.reuse_counts().items())]
    return JsonResponse({"token_requests": rows, "refresh_token_reuse": reused})


@_admin_only("POST")
def reset_counters(request: HttpRequest, body: dict[str, Any]) -> HttpResponse:
    """Zero the counters (a test's baseline)."""
    STATE.reset_counts()
    return JsonResponse({"token_requests": [], "refresh_token_reuse": []})


urlpatterns = [
    path("users/<str:username>/password", set_password),
    path("clients/<str:client_id>/secret", rotate_client_secret),
    path("clients/<str:client_id>/revoke-tokens", revoke_client_tokens),
    path("counters", counters),
    path("counters/reset", reset_counters),
]
