"""Which RBAC rule a Kubernetes API request needs, from its method and REST path."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

Rule = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

_DISCOVERY = re.compile(r"^/(version|api(/v1)?|apis(/[^/]+(/[^/]+)?)?)/?$")
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def rule_of(method: str, url: str) -> Rule | None:
    """The (apiGroup, resource, verb) of one request; None for discovery (system:discovery)."""
    parts = urlsplit(url)
    if _DISCOVERY.match(parts.path):
        return None
    segments = parts.path.strip("/").split("/")
    group, rest = ("", segments[2:]) if segments[0] == "api" else (segments[1], segments[3:])
    if rest[:1] == ["namespaces"] and len(rest) >= 3:
        rest = rest[2:]  # a namespaced resource: drop "namespaces/<ns>"
    resource, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
    if method == "GET":
        watching = parse_qs(parts.query).get("watch", ["false"])[0] in ("true", "1")
        verb = "watch" if watching else ("get" if name else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = _VERBS[method]
    return group, f"{resource}/{sub}" if sub else resource, verb
