"""URLconf: DOT's token-side endpoints under ``/o/``, the test admin under ``/admin-test/``.

Only the DOT routes this IdP supports are mounted. The interactive ones (application
management, device flow, logout, dynamic registration) need sessions and templates
this server does not have. ``authorize`` must still exist because DOT's discovery
document reverses it, so it answers with a plain "not supported" instead of DOT's
login-redirecting view.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import include, path
from oauth2_provider import urls as dot_urls

from tokensync.devkit.idp import testadmin

__all__ = ["urlpatterns"]

_DOT_ROUTES = {"token", "revoke-token", "introspect", "oidc-connect-discovery-info", "jwks-info", "user-info"}


def authorization_endpoint_unsupported(request: HttpRequest) -> HttpResponse:
    """This IdP serves no browser flows (no authorization code grant)."""
    return JsonResponse(
        {"error": "unsupported_response_type", "error_description": "no browser flows in this IdP"},
        status=400,
    )


_oauth_patterns = [
    path("authorize/", authorization_endpoint_unsupported, name="authorize"),
    *(
        pattern
        for pattern in (
            *dot_urls.base_urlpatterns,
            *dot_urls.oidc_urlpatterns,
            *dot_urls.metadata_urlpatterns,
        )
        if pattern.name in _DOT_ROUTES or str(pattern.name).startswith("oauth-")
    ),
]

urlpatterns = [
    path("o/", include((_oauth_patterns, "oauth2_provider"), namespace="oauth2_provider")),
    path("admin-test/", include(testadmin.urlpatterns)),
]
