"""``tokensync status`` and ``tokensync refresh``: the credentials of a cluster, for humans.

``status`` is what ``kubectl get oauthcredentials`` would show with the right
custom columns and durations people read ("in 4m", "3s ago"). ``refresh`` asks
the operator for an immediate renewal the way ``cmctl renew`` does for
cert-manager: it sets the ``tokensync.dev/refresh-requested-at`` annotation with
a merge patch, and the operator answers by renewing and recording the value in
``status.handledRefreshRequest`` (the contract of
:data:`tokensync.controller.REFRESH_ANNOTATION`). Nothing here talks to the
operator directly; it may run anywhere the API server is reachable.

These calls go through the official synchronous ``kubernetes`` client rather than
the operator's :class:`~tokensync.controller.KubeClient`: a command makes a handful
of calls, and the operator's client deliberately offers only the calls its RBAC
allows (it never lists or patches credentials' metadata).

Exit codes: 0 success, 1 API or kubeconfig failure (or ``--wait`` timed out),
2 usage, 3 the refresh failed permanently (``Stalled``), 4 it failed transiently.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from tokensync.cli.token import (
    EXIT_FAILURE,
    EXIT_PERMANENT,
    EXIT_TRANSIENT,
    CommandError,
    exit_with,
    human_delta,
)
from tokensync.controller import REFRESH_ANNOTATION, load_configuration
from tokensync.models.credential import GROUP, PLURAL, VERSION

__all__ = ["ago", "refresh_command", "render_status", "status_command"]

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
REQUEST_TIMEOUT = 30.0
COLUMNS = ("NAMESPACE", "NAME", "GRANT", "READY", "REASON", "EXPIRES-IN", "NEXT-REFRESH", "SECRET")


def _parse_stamp(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)


def ago(value: Any, now: datetime) -> str:
    """``in 4m`` for the future, ``3s ago`` for the past, ``-`` when unknown."""
    stamp = _parse_stamp(value)
    if stamp is None:
        return "-"
    delta = (stamp - now).total_seconds()
    return f"in {human_delta(delta)}" if delta >= 0 else f"{human_delta(delta)} ago"


def _condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = (body.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if isinstance(c, dict) and c.get("type") == kind), {})


def render_status(items: Iterable[dict[str, Any]], now: datetime) -> list[str]:
    """The table's lines, header first, sorted by namespace and name."""
    rows = [COLUMNS]
    for item in sorted(items, key=lambda i: (i["metadata"].get("namespace", ""), i["metadata"]["name"])):
        status = item.get("status") or {}
        ready = _condition(item, "Ready")
        rows.append(
            (
                item["metadata"].get("namespace", "-"),
                item["metadata"]["name"],
                str(((item.get("spec") or {}).get("grant") or {}).get("type") or "-"),
                str(ready.get("status") or "-"),
                str(ready.get("reason") or "-"),
                ago(status.get("expiresAt"), now),
                ago(status.get("nextRefreshTime"), now),
                str(status.get("secretName") or "-"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return ["   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


# -- the API --------------------------------------------------------------------------------


def _default_namespace(kubeconfig: str | None, context: str | None) -> str:
    """The namespace kubectl would use: the pod's own in a cluster, else the context's, else default."""
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text(encoding="utf-8").strip() or "default"
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except Exception:  # already loaded once by load_configuration: a failure here only loses the default
        return "default"
    chosen = next((c for c in contexts or [] if c.get("name") == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace")
    return str(namespace) if namespace else "default"


def _connect(kubeconfig: str | None, context: str | None) -> tuple[Any, str, str]:
    """A CustomObjectsApi, the default namespace, and the server URL (for messages)."""
    try:
        configuration = load_configuration(kubeconfig, context)
    except Exception as exc:  # kubeconfig parsing raises a zoo of types; the text names the file
        raise CommandError(
            f"cannot load Kubernetes credentials: {exc}",
            hint="pass --kubeconfig, set KUBECONFIG, or run in a pod with a service account",
        ) from None
    from kubernetes import client

    api = client.CustomObjectsApi(client.ApiClient(configuration))
    return api, _default_namespace(kubeconfig, context), str(configuration.host)


def _call(
    server: str, what: str, function: Callable[..., Any], *args: Any, not_found: str | None = None, **kwargs: Any
) -> Any:
    """One API call; its failure as one line. API error bodies are Status objects, safe to quote."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        return function(*args, **kwargs, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as exc:
        message = ""
        with contextlib.suppress(ValueError, AttributeError):
            message = str(json.loads(exc.body or "{}").get("message") or "")[:300]
        status = exc.status
        if status == 404 and not_found:
            raise CommandError(not_found, hint="list them with: tokensync status -A") from None
        text = f"{what}: HTTP {status} {exc.reason or ''}".rstrip() + (f": {message}" if message else "")
        hint = {
            401: "the API server rejected the credentials; check --kubeconfig and --context",
            403: "your user lacks RBAC permission for oauthcredentials.tokensync.dev",
        }.get(status or 0)
        raise CommandError(text, hint=hint) from None
    except HTTPError as exc:
        raise CommandError(
            f"{what}: cannot reach the API server at {server} ({type(exc).__name__})",
            hint="is the cluster up, and are --kubeconfig and --context right?",
        ) from None


def _list(api: Any, server: str, namespace: str | None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        options: dict[str, Any] = {"limit": 500}
        if token:
            options["_continue"] = token
        if namespace is None:
            page = _call(server, "list oauthcredentials", api.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                         **options)  # fmt: skip
        else:
            page = _call(server, f"list oauthcredentials in {namespace}", api.list_namespaced_custom_object,
                         GROUP, VERSION, namespace, PLURAL, **options)  # fmt: skip
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items


def _get(api: Any, server: str, namespace: str, name: str) -> dict[str, Any]:
    body: dict[str, Any] = _call(
        server, f"get oauthcredential {namespace}/{name}", api.get_namespaced_custom_object,
        GROUP, VERSION, namespace, PLURAL, name,
        not_found=f"OAuthCredential {name} not found in namespace {namespace}",
    )  # fmt: skip
    return body


def _run(action: Callable[[], None]) -> None:
    """Run a command body: CommandErrors become one line and their exit code; Ctrl-C exits 130."""
    try:
        action()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except CommandError as exc:
        exit_with(exc)


# -- the commands ---------------------------------------------------------------------------


@click.command("status")
@click.option("-n", "--namespace", default=None, help="The namespace (default: the context's).")
@click.option("-A", "--all-namespaces", is_flag=True, help="Every namespace.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="Kubeconfig file.")
@click.option("--context", default=None, help="Kubeconfig context.")
def status_command(namespace: str | None, all_namespaces: bool, kubeconfig: str | None, context: str | None) -> None:
    """Show OAuthCredentials: readiness, token expiry, next refresh, target Secret."""

    def body() -> None:
        api, default_namespace, server = _connect(kubeconfig, context)
        scope = None if all_namespaces else namespace or default_namespace
        items = _list(api, server, scope)
        if not items:
            where = "any namespace" if scope is None else f"namespace {scope}"
            click.echo(f"No OAuthCredentials found in {where}.", err=True)
            return
        click.echo("\n".join(render_status(items, datetime.now(UTC))))

    _run(body)


def _request_value(previous: str | None) -> str:
    """Now, RFC 3339. A second request within the same second gets fractional seconds,
    because an unchanged value is not a new request to the operator."""
    now = datetime.now(UTC)
    value = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if value == previous else value


@click.command("refresh")
@click.argument("name")
@click.option("-n", "--namespace", default=None, help="The namespace (default: the context's).")
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="Kubeconfig file.")
@click.option("--context", default=None, help="Kubeconfig context.")
@click.option("--wait", is_flag=True, help="Wait until the operator has renewed the token.")
@click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True, help="With --wait (s).")
def refresh_command(
    name: str,
    namespace: str | None,
    kubeconfig: str | None,
    context: str | None,
    wait: bool,
    timeout: float,
) -> None:
    """Ask the operator to renew NAME's token now (the refresh-requested-at annotation)."""

    def body() -> None:
        api, default_namespace, server = _connect(kubeconfig, context)
        scope = namespace or default_namespace
        current = _get(api, server, scope, name)
        previous = ((current.get("metadata") or {}).get("annotations") or {}).get(REFRESH_ANNOTATION)
        value = _request_value(previous)
        patch = {"metadata": {"annotations": {REFRESH_ANNOTATION: value}}}
        _call(server, f"patch oauthcredential {scope}/{name}", api.patch_namespaced_custom_object,
              GROUP, VERSION, scope, PLURAL, name, patch)  # fmt: skip
        click.echo(f"oauthcredential {scope}/{name}: refresh requested ({REFRESH_ANNOTATION}={value})")
        if wait:
            _wait_for(api, server, scope, name, value, timeout)

    _run(body)


def _wait_for(api: Any, server: str, namespace: str, name: str, value: str, timeout: float) -> None:
    """Until the operator records ``value`` as handled; success is Ready with no failed attempt.

    A failed renewal records the request as handled too (it is not retried as a
    manual request), so a failure ends the wait with the condition's reason.
    """
    deadline = time.monotonic() + timeout
    while True:
        body = _get(api, server, namespace, name)
        status = body.get("status") or {}
        if status.get("handledRefreshRequest") == value:
            ready = _condition(body, "Ready")
            if ready.get("status") == "True" and not status.get("failedAttempts"):
                expires = status.get("expiresAt")
                when = f"{expires} ({ago(expires, datetime.now(UTC))})" if expires else "an unknown time"
                click.echo(f"oauthcredential {namespace}/{name}: token renewed, expires at {when}")
                return
            stalled = _condition(body, "Stalled")
            cause = stalled or _condition(body, "Reconciling") or ready
            raise CommandError(
                f"oauthcredential {namespace}/{name}: refresh failed: "
                f"{cause.get('reason') or 'Unknown'}: {cause.get('message') or 'no message'}",
                code=EXIT_PERMANENT if stalled.get("status") == "True" else EXIT_TRANSIENT,
                hint=f"kubectl describe oauthcredential -n {namespace} {name}",
            )
        if time.monotonic() >= deadline:
            raise CommandError(
                f"oauthcredential {namespace}/{name}: the refresh was not handled within {timeout:g}s",
                code=EXIT_FAILURE,
                hint="is the tokensync operator running, and watching this namespace?",
            )
        time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
