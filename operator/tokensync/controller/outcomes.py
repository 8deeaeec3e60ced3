"""Every failure maps to a condition reason here, and only here.

::

    ControllerError
    ├── InvalidSpecError       the spec cannot work as written (field named)      permanent
    ├── ReferenceMissingError  a referenced Secret or key does not exist yet      transient
    ├── LeaseHeldError         another process is refreshing this credential      transient
    └── SecretConflictError    the target Secret exists and is not ours           permanent

plus the token library's tree (:mod:`tokensync.auth.errors`), store errors and
API errors. "Permanent" means: no retry until something changes (the spec, a
referenced Secret, or a manual refresh request); "transient" means exponential
backoff. Messages are safe for status and Events: they name fields and Secrets,
never values.

Conditions follow kstatus, so ``kubectl wait --for=condition=Ready``, Flux and
Argo CD health checks work without custom code:

* ``Ready``: the target Secret holds a valid token for the current spec;
* ``Reconciling``: work is in progress or being retried;
* ``Stalled``: a human must act; the reason says what.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from tokensync.auth.errors import (
    ConfigurationError,
    InvalidClientError,
    InvalidGrantError,
    InvalidScopeError,
    OAuthError,
    ReauthenticationRequired,
    TransientTokenError,
    UnauthorizedClientError,
)
from tokensync.controller.templates import TemplateError
from tokensync.stores.base import StoreError
from tokensync.stores.kubernetes import ApiError

__all__ = [
    "ControllerError",
    "InvalidSpecError",
    "LeaseHeldError",
    "Outcome",
    "ReferenceMissingError",
    "SecretBusyError",
    "SecretConflictError",
    "classify",
    "conditions",
]


class ControllerError(Exception):
    """A failure the controller itself detected."""


class InvalidSpecError(ControllerError):
    """The spec cannot work as written; the message names the field."""


class ReferenceMissingError(ControllerError):
    """A referenced Secret, or a key in it, does not exist (yet)."""


class SecretConflictError(ControllerError):
    """The target Secret exists and was not created by tokensync for this credential."""


class LeaseHeldError(ControllerError):
    """Another operator process holds this credential's lease: it is refreshing it right now."""


class SecretBusyError(ControllerError):
    """The target Secret kept changing while tokensync wrote it (a race, retried)."""


@dataclass(frozen=True)
class Outcome:
    reason: str
    message: str
    permanent: bool
    retry_after: float | None = None


def classify(exc: BaseException) -> Outcome:
    """The reason, message and retry class of a failure."""
    text = str(exc) or type(exc).__name__
    match exc:
        case InvalidSpecError() | TemplateError():
            return Outcome("InvalidSpec", text, permanent=True)
        case ReferenceMissingError():
            return Outcome("SecretNotFound", text, permanent=False)
        case SecretConflictError():
            return Outcome("SecretConflict", text, permanent=True)
        case LeaseHeldError():
            return Outcome("RefreshInProgress", text, permanent=False)
        case SecretBusyError():
            return Outcome("SecretConflict", text, permanent=False)
        case ReauthenticationRequired():
            return Outcome("ReauthenticationRequired", text, permanent=True)
        case InvalidClientError() | UnauthorizedClientError():
            return Outcome("InvalidClient", text, permanent=True)
        case InvalidGrantError():
            return Outcome("InvalidGrant", text, permanent=True)
        case InvalidScopeError():
            return Outcome("InvalidScope", text, permanent=True)
        case OAuthError():
            return Outcome("TokenRequestRejected", text, permanent=True)
        case ConfigurationError():
            return Outcome("InvalidSpec", text, permanent=True)
        case TransientTokenError():
            return Outcome("IssuerUnavailable", text, permanent=False, retry_after=exc.retry_after)
        case StoreError():
            return Outcome("StoreUnavailable", text, permanent=False)
        case ApiError():
            return Outcome("APIUnavailable", text, permanent=False)
        case _:
            return Outcome("InternalError", f"unexpected {type(exc).__name__}; see operator logs", permanent=False)


Status = Literal["True", "False", "Unknown"]


def _condition(
    previous: dict[str, dict[str, Any]],
    kind: str,
    status: Status,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: datetime,
) -> dict[str, Any]:
    before = previous.get(kind)
    # lastTransitionTime moves only when the status does: that is what the field
    # means, and it keeps steady-state status writes byte-identical.
    changed = before is None or before.get("status") != status
    when = now.strftime("%Y-%m-%dT%H:%M:%SZ") if changed else before.get("lastTransitionTime")  # type: ignore[union-attr]
    condition = {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": when}
    if generation is not None:
        condition["observedGeneration"] = generation
    return condition


def conditions(
    previous: list[dict[str, Any]] | None,
    *,
    ready: tuple[bool, str, str],
    reconciling: tuple[bool, str, str] | None,
    stalled: tuple[bool, str, str] | None,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """Ready, plus Reconciling and Stalled only while they are True (kstatus: absent means False)."""
    by_type = {c.get("type", ""): c for c in previous or []}
    flag: dict[bool, Status] = {True: "True", False: "False"}
    result = [_condition(by_type, "Ready", flag[ready[0]], ready[1], ready[2], generation=generation, now=now)]
    for kind, value in (("Reconciling", reconciling), ("Stalled", stalled)):
        if value is not None and value[0]:
            result.append(_condition(by_type, kind, "True", value[1], value[2], generation=generation, now=now))
    return result
