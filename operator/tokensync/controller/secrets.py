"""The Secrets tokensync writes: what they contain, how they are marked, whose they are.

Two Secrets per credential (with the ``secret`` store backend):

* the **target** Secret, mounted by workloads: only what they need (by default
  ``access_token``, ``token_type``, ``expires_at``; or the template's keys). Never
  the refresh token.
* the **state** Secret (:func:`state_secret_name`): the full token set and the
  fingerprints of the inputs that produced it, read only by the operator.

Both carry ``app.kubernetes.io/managed-by: tokensync`` and a ``tokensync.dev/role``
label: the operator watches and lists Secrets by that label only, so it never
caches the cluster's other Secrets. Ownership is the pair (managed-by label,
``tokensync.dev/credential`` annotation naming the CR): a Secret without both is
someone else's and is never overwritten. Users may label their *source* Secrets
``tokensync.dev/role: source`` to have a change (a rotated client secret) picked
up at once instead of at the next refresh.

Data comparisons decide whether to write at all: an unchanged Secret is never
rewritten, which is what keeps restarts and steady refreshes cheap for the API
server and for every kubelet that watches the Secret.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from tokensync.controller.templates import render_templates, template_values
from tokensync.models.credential import API_VERSION, KIND, DeletionPolicy, OAuthCredential
from tokensync.models.tokens import TokenSet

__all__ = [
    "CREDENTIAL_ANNOTATION",
    "MANAGED_BY",
    "ROLE_LABEL",
    "WATCH_SELECTOR",
    "desired_target",
    "is_ours",
    "owner_reference",
    "secret_differs",
    "state_secret_name",
]

MANAGED_BY = ("app.kubernetes.io/managed-by", "tokensync")
ROLE_LABEL = "tokensync.dev/role"
CREDENTIAL_ANNOTATION = "tokensync.dev/credential"
EXPIRES_ANNOTATION = "tokensync.dev/expires-at"
WATCH_SELECTOR = ROLE_LABEL  # existence: target, state and opted-in source Secrets


def state_secret_name(credential_name: str) -> str:
    """``<name>-tokensync-state``, shortened with a hash when that would be too long."""
    suffix = "-tokensync-state"
    if len(credential_name) + len(suffix) <= 253:
        return credential_name + suffix
    digest = hashlib.sha256(credential_name.encode()).hexdigest()[:10]
    return f"{credential_name[: 253 - len(suffix) - 11]}-{digest}{suffix}"


def owner_reference(credential: OAuthCredential) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": credential.metadata.name,
        "uid": credential.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": False,
    }


def managed_labels(role: str) -> dict[str, str]:
    return {MANAGED_BY[0]: MANAGED_BY[1], ROLE_LABEL: role}


def desired_target(credential: OAuthCredential, token_set: TokenSet) -> dict[str, Any]:
    """The full target Secret body for this token set (without resourceVersion)."""
    target = credential.spec.effective_target()
    fields = template_values(token_set)
    if target.template:
        values = render_templates(target.template, fields)
    else:
        values = {key: fields[key] for key in ("access_token", "token_type", "expires_at")}
    labels = {**(target.labels or {}), **managed_labels("target")}
    annotations = {
        **(target.annotations or {}),
        CREDENTIAL_ANNOTATION: credential.metadata.name,
        EXPIRES_ANNOTATION: fields["expires_at"],
    }
    metadata: dict[str, Any] = {
        "name": target.secret_name or credential.metadata.name,
        "namespace": credential.metadata.namespace,
        "labels": labels,
        "annotations": annotations,
    }
    if (target.deletion_policy or DeletionPolicy.DELETE) == DeletionPolicy.DELETE:
        metadata["ownerReferences"] = [owner_reference(credential)]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": target.type or "Opaque",
        "data": {key: base64.b64encode(value.encode()).decode() for key, value in values.items()},
    }


def is_ours(secret: Mapping[str, Any], credential_name: str) -> bool:
    """Whether this Secret was created by tokensync as this credential's target."""
    metadata = secret.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    return (
        labels.get(MANAGED_BY[0]) == MANAGED_BY[1]
        and labels.get(ROLE_LABEL) == "target"
        and annotations.get(CREDENTIAL_ANNOTATION) == credential_name
    )


def secret_differs(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> bool:
    """Whether writing ``desired`` would change anything that matters.

    Labels and annotations are compared as a subset, so that what other tools add
    (Argo CD tracking, Reflector) is left alone rather than fought over.
    """
    if (actual.get("data") or {}) != (desired.get("data") or {}):
        return True
    if (actual.get("type") or "Opaque") != desired.get("type"):
        return True
    a_meta, d_meta = actual.get("metadata") or {}, desired.get("metadata") or {}
    for field in ("labels", "annotations"):
        have = a_meta.get(field) or {}
        if any(have.get(k) != v for k, v in (d_meta.get(field) or {}).items()):
            return True
    # Only our own owner references count: others' (a Reflector, an Argo CD app)
    # are kept as they are, not fought over with a write per reconcile.
    want_owners = {o.get("uid") for o in d_meta.get("ownerReferences") or [] if o.get("kind") == KIND}
    have_owners = {o.get("uid") for o in a_meta.get("ownerReferences") or [] if o.get("kind") == KIND}
    return want_owners != have_owners


def merged_for_replace(actual: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The body for a PUT: desired content, keeping others' labels/annotations and the resourceVersion."""
    a_meta = actual.get("metadata") or {}
    d_meta = desired["metadata"]
    metadata = dict(d_meta)
    metadata["labels"] = {**(a_meta.get("labels") or {}), **(d_meta.get("labels") or {})}
    metadata["annotations"] = {**(a_meta.get("annotations") or {}), **(d_meta.get("annotations") or {})}
    foreign_owners = [o for o in a_meta.get("ownerReferences") or [] if o.get("kind") != KIND]
    owners = foreign_owners + list(d_meta.get("ownerReferences") or [])
    if owners:
        metadata["ownerReferences"] = owners
    else:
        metadata.pop("ownerReferences", None)
    if a_meta.get("resourceVersion"):
        metadata["resourceVersion"] = a_meta["resourceVersion"]
    return {**desired, "metadata": metadata}
