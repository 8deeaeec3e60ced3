"""``tokensync demo``: the operator on an embedded default, in one process.

Three real things on loopback: a Kubernetes API emulator (kmock, extended in
:mod:`tokensync.devkit.kube`), an OAuth2 server (django-oauth-toolkit, in
:mod:`tokensync.devkit.idp`) issuing short-lived tokens, and the unmodified
operator (kopf plus tokensync's handlers). The demo applies one credential per
grant and prints a live table as tokens land and refresh. Nothing here is used by
the operator itself; it needs the ``demo`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import httpx

from tokensync.handlers import Wiring
from tokensync.models.settings import OperatorSettings

__all__ = ["run_demo"]

NAMESPACE = "demo"


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _credential(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tokensync.dev/v1alpha1",
        "kind": "OAuthCredential",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


def _world(token_url: str, issuer_url: str, creds: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """What a user would ``kubectl apply``: Secrets with credentials, then OAuthCredentials."""
    ref = {"name": "demo-clients", "key": "cc"}
    return [
        ("secrets", _secret("demo-clients", {"cc": creds["cc"], "pw": creds["pw"]})),
        ("secrets", _secret("demo-user", {"username": "demo", "password": creds["user"]})),
        ("secrets", _secret("demo-bootstrap", {"token": creds["bootstrap"]})),
        (
            "oauthcredentials",
            _credential(
                "billing-api",
                {
                    "issuer": {"tokenURL": token_url},
                    "grant": {"type": "client_credentials", "clientID": "demo-service", "clientSecretRef": ref},
                },
            ),
        ),
        (
            "oauthcredentials",
            _credential(
                "reports-user",
                {
                    "issuer": {"issuerURL": issuer_url},
                    "grant": {
                        "type": "password",
                        "clientID": "demo-app",
                        "clientSecretRef": {"name": "demo-clients", "key": "pw"},
                        "usernameRef": {"name": "demo-user", "key": "username"},
                        "passwordRef": {"name": "demo-user", "key": "password"},
                        "scopes": ["read"],
                    },
                    "target": {"template": {"Authorization": "{{ token_type }} {{ access_token }}"}},
                },
            ),
        ),
        (
            "oauthcredentials",
            _credential(
                "partner-sync",
                {
                    "issuer": {"tokenURL": token_url},
                    "grant": {
                        "type": "refresh_token",
                        "clientID": "demo-app",
                        "clientSecretRef": {"name": "demo-clients", "key": "pw"},
                        "refreshTokenRef": {"name": "demo-bootstrap", "key": "token"},
                    },
                },
            ),
        ),
    ]


def _ago(stamp: str | None, now: float) -> str:
    if not stamp:
        return "-"
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    delta = round(when - now)
    return f"in {delta}s" if delta >= 0 else f"{-delta}s ago"


def render_table(items: list[dict[str, Any]], now: float) -> list[str]:
    rows = [("CREDENTIAL", "GRANT", "READY", "REASON", "EXPIRES", "NEXT REFRESH", "REFRESHES", "SECRET")]
    for item in sorted(items, key=lambda i: i["metadata"]["name"]):
        status = item.get("status") or {}
        ready: dict[str, Any] = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        rows.append(
            (
                item["metadata"]["name"],
                item["spec"]["grant"]["type"],
                ready.get("status", "-"),
                ready.get("reason", "-"),
                _ago(status.get("expiresAt"), now),
                _ago(status.get("nextRefreshTime"), now),
                str(max(0, int(status.get("refreshCount") or 0) - 1)),
                status.get("secretName") or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


async def run_demo(*, lifetime: int = 20, once: bool = False, timeout: float = 120.0, out: TextIO = sys.stdout) -> int:
    """Run the demo; with ``once``, return 0 after every credential refreshed once (1 on timeout)."""
    from tokensync.devkit.idp import ClientConfig, IdpConfig, UserConfig, start_idp
    from tokensync.devkit.kube import serve_cluster
    from tokensync.models.crd import crd_manifest

    creds = {name: secrets.token_urlsafe(18) for name in ("cc", "pw", "user")}
    config = IdpConfig.model_validate(
        {
            "access_token_lifetime": lifetime,
            "clients": [
                ClientConfig.model_validate(
                    {"client_id": "demo-service", "client_secret": creds["cc"], "grant_types": ["client_credentials"]}
                ),
                ClientConfig.model_validate(
                    {
                        "client_id": "demo-app",
                        "client_secret": creds["pw"],
                        "grant_types": ["password", "refresh_token"],
                    }
                ),
            ],
            "users": [UserConfig.model_validate({"username": "demo", "password": creds["user"]})],
        }
    )
    out.write(f"Starting an OAuth2 server (django-oauth-toolkit), tokens live {lifetime}s ...\n")
    idp = await asyncio.to_thread(start_idp, config)
    try:
        async with httpx.AsyncClient() as http:
            bootstrap = await http.post(
                idp.token_url,
                data={"grant_type": "password", "username": "demo", "password": creds["user"]},
                auth=("demo-app", creds["pw"]),
            )
            creds["bootstrap"] = bootstrap.json()["refresh_token"]
        out.write("Starting a Kubernetes API emulator and the tokensync operator ...\n")
        async with serve_cluster(crds=[crd_manifest()], namespaces=["default", NAMESPACE]) as cluster:
            return await _drive(cluster.url, idp, creds, once=once, timeout=timeout, out=out)
    finally:
        await asyncio.to_thread(idp.stop)


async def _drive(url: str, idp: Any, creds: dict[str, str], *, once: bool, timeout: float, out: TextIO) -> int:
    from tokensync.cli import run_operator

    stop = asyncio.Event()
    settings = OperatorSettings(metrics_port=0)
    operator = asyncio.create_task(run_operator(Wiring(settings=settings, server_url=url), stop=stop))
    interactive = out.isatty()
    try:
        async with httpx.AsyncClient(base_url=url) as api:
            for plural, body in _world(idp.token_url, idp.issuer_url, creds):
                group = "/apis/tokensync.dev/v1alpha1" if plural == "oauthcredentials" else "/api/v1"
                response = await api.post(f"{group}/namespaces/{NAMESPACE}/{plural}", json=body)
                response.raise_for_status()
                if plural == "oauthcredentials":
                    out.write(f"applied OAuthCredential {body['metadata']['name']} ({body['spec']['grant']['type']})\n")
            started = time.monotonic()
            while True:
                await asyncio.sleep(1.0)
                if operator.done():
                    operator.result()
                    return 1
                listing = await api.get(f"/apis/tokensync.dev/v1alpha1/namespaces/{NAMESPACE}/oauthcredentials")
                items = listing.json().get("items", [])
                lines = render_table(items, time.time())
                stamp = datetime.now(UTC).strftime("%H:%M:%S")
                if interactive:
                    out.write("\x1b[H\x1b[2J")
                out.write(f"\n{stamp}  tokens land and refresh; Ctrl-C to stop\n" + "\n".join(lines) + "\n")
                out.flush()
                refreshed = all(int((i.get("status") or {}).get("refreshCount") or 0) >= 2 for i in items)
                if once and items and refreshed:
                    out.write("every credential got a token and refreshed it: done\n")
                    return 0
                if once and time.monotonic() - started > timeout:
                    out.write(f"not every credential refreshed within {timeout:.0f}s\n")
                    return 1
    finally:
        stop.set()
        try:
            await asyncio.wait_for(operator, timeout=15)
        except (TimeoutError, Exception):  # shutting down: the table already told the story
            operator.cancel()
