"""Counts token-endpoint requests per client, grant type and response status.

Tests assert on how often tokensync really went to the IdP ("ten concurrent callers,
one refresh"), which the client side cannot prove about itself. Every request to the
token endpoint is counted, failed ones included: each one cost the IdP a round trip.

The client is identified the way the request claims, before any authentication (a
rejected request is counted under the id it claimed): Basic credentials, the
``client_id`` form field, or the ``iss`` of a client assertion. Credentials are
decoded only to read that id; nothing is logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jwt

from tokensync.devkit.idp.settings import TOKEN_PATH
from tokensync.devkit.idp.state import STATE
from tokensync.devkit.idp.wire import basic_client_id

__all__ = ["TokenRequestCounter", "claimed_client_id"]


def claimed_client_id(request: Any) -> str:
    """The client a token request claims to come from; ``""`` if it names none."""
    authorization = str(request.META.get("HTTP_AUTHORIZATION", ""))
    scheme, _, credentials = authorization.partition(" ")
    if scheme == "Basic":
        return basic_client_id(credentials.strip()) or ""
    client_id = request.POST.get("client_id")
    if client_id:
        return str(client_id)
    assertion = request.POST.get("client_assertion")
    if assertion:
        try:
            issuer = jwt.decode(str(assertion), options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError:
            return ""
        return issuer if isinstance(issuer, str) else ""
    return ""


class TokenRequestCounter:
    """Django middleware: one count per request to the token endpoint."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        if request.path != TOKEN_PATH or request.method != "POST":
            return self.get_response(request)
        # Read the form before the view does; Django caches the body for urlencoded posts.
        client_id = claimed_client_id(request)
        grant_type = str(request.POST.get("grant_type", ""))
        response = self.get_response(request)
        STATE.count(client_id, grant_type, int(response.status_code))
        return response
