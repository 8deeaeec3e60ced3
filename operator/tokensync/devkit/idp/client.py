"""A small synchronous client for a running IdP's ``/admin-test/`` and introspection endpoints.

Shared by the in-process handle (:attr:`RunningIdp.admin`) and the test fixtures that
run the IdP as a subprocess, so both drive the server the same way. Introspection
goes through DOT's real RFC 7662 endpoint, authenticated as the built-in
introspector client (whose secret is the admin token).
"""

from __future__ import annotations

from typing import Any, cast

import httpx

from tokensync.devkit.idp.config import INTROSPECTOR_CLIENT_ID

__all__ = ["IdpAdmin", "IdpAdminError"]


class IdpAdminError(RuntimeError):
    """An admin call failed; the message has the status and the server's JSON error."""


class IdpAdmin:
    """Drive a running IdP from a test: passwords, secrets, revocation, counters."""

    def __init__(self, url: str, admin_token: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._admin_token = admin_token
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"IdpAdmin({self.url!r})"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = httpx.request(
            method,
            f"{self.url}/admin-test/{path}",
            json=body,
            headers={"Authorization": f"Bearer {self._admin_token}"},
            timeout=self._timeout,
        )
        if response.status_code != 200:
            raise IdpAdminError(f"{method} /admin-test/{path}: {response.status_code} {response.text}")
        return cast(dict[str, Any], response.json())

    def set_password(self, username: str, password: str) -> None:
        """Change a user's password; their next password grant needs the new one."""
        self._call("POST", f"users/{username}/password", {"password": password})

    def rotate_client_secret(self, client_id: str, new_secret: str) -> None:
        """Replace a client's secret; the old one fails immediately."""
        self._call("POST", f"clients/{client_id}/secret", {"client_secret": new_secret})

    def revoke_client_tokens(self, client_id: str) -> dict[str, Any]:
        """Revoke all access and refresh tokens of a client; returns how many of each."""
        return self._call("POST", f"clients/{client_id}/revoke-tokens")

    def token_request_counts(self) -> list[dict[str, Any]]:
        """Rows of ``{client_id, grant_type, status, count}`` for the token endpoint."""
        return cast(list[dict[str, Any]], self._call("GET", "counters")["token_requests"])

    def token_request_count(
        self, client_id: str | None = None, grant_type: str | None = None, status: int | None = None
    ) -> int:
        """Token-endpoint requests so far, failed ones included, filtered by any of the keys."""
        return sum(
            int(row["count"])
            for row in self.token_request_counts()
            if (client_id is None or row["client_id"] == client_id)
            and (grant_type is None or row["grant_type"] == grant_type)
            and (status is None or row["status"] == status)
        )

    def refresh_token_reuse_count(self, client_id: str | None = None) -> int:
        """Presentations of a refresh token that was already rotated away or revoked.

        Each one is a refresh token spent twice; with reuse protection on (the default)
        the IdP answered it by revoking the whole token family.
        """
        rows = cast(list[dict[str, Any]], self._call("GET", "counters")["refresh_token_reuse"])
        return sum(int(row["count"]) for row in rows if client_id is None or row["client_id"] == client_id)

    def reset_counters(self) -> None:
        self._call("POST", "counters/reset")

    def introspect(self, token: str, *, token_type_hint: str | None = None) -> dict[str, Any]:
        """RFC 7662 introspection of an access token: ``{"active": bool, ...}``."""
        form = {"token": token}
        if token_type_hint is not None:
            form["token_type_hint"] = token_type_hint
        response = httpx.post(
            f"{self.url}/o/introspect/",
            data=form,
            auth=(INTROSPECTOR_CLIENT_ID, self._admin_token),
            timeout=self._timeout,
        )
        if response.status_code != 200:
            raise IdpAdminError(f"introspection: {response.status_code} {response.text}")
        return cast(dict[str, Any], response.json())
