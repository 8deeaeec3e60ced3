"""A credential store in one Kubernetes Secret: the operator's default backend.

The store defines the little it needs of the Kubernetes API as a protocol
(:class:`SecretsAPI`) and the errors that protocol raises. The operator's HTTP
client implements it; tests may use any fake. This keeps the store free of any
particular client library, and the dependency pointing downwards.

Beyond the :mod:`tokensync.stores.base` contract:

* Writes are compare-and-swap on ``metadata.resourceVersion``: a save replaces
  the Secret only if nobody changed it since this store last read or wrote it,
  otherwise :class:`StoreConflictError`. Two writers holding different refresh
  tokens must not silently overwrite each other: the loser would keep using a
  token set that is no longer stored anywhere.
* The store is also its own :class:`~tokensync.stores.base.AsyncLease`: the lease
  is an annotation on the same Secret (owner and expiry), taken by the same
  compare-and-swap. A save writes the Secret without it, so the write that stores
  the new token set also releases the lease: one API write for the lock, none
  for the unlock, and no separate Lease object (nor RBAC for one).
* The Secret carries the labels, annotations and owner references the caller
  gives, so that it is found by a labelled LIST and garbage-collected with its
  owner.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from tokensync.stores.base import (
    AsyncCredentialStore,
    AsyncLease,
    Deserializer,
    LeaseGrant,
    Serializer,
    StoreConflictError,
    StoreError,
    decode_or_none,
)

__all__ = [
    "ApiConflictError",
    "ApiError",
    "ApiNotFoundError",
    "KubernetesSecretStore",
    "SecretsAPI",
    "StoreConflictError",
]

logger = logging.getLogger("tokensync.stores")
T = TypeVar("T")


class ApiError(Exception):
    """A Kubernetes API call failed; ``status`` is the HTTP status (0 when none came)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class ApiNotFoundError(ApiError):
    """HTTP 404."""


class ApiConflictError(ApiError):
    """HTTP 409: ``AlreadyExists`` on create, ``Conflict`` on a stale resourceVersion."""


class SecretsAPI(Protocol):
    """The Secret operations a store needs; implementations raise :class:`ApiError` subclasses."""

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]: ...
    async def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]: ...
    async def delete_secret(self, namespace: str, name: str) -> None: ...


LEASE_ANNOTATION = "tokensync.dev/lease"


class KubernetesSecretStore(AsyncCredentialStore[T], AsyncLease):
    """One value in one key of one Secret, and the lease that guards it."""

    def __init__(
        self,
        api: SecretsAPI,
        *,
        namespace: str,
        name: str,
        serialize: Serializer[T],
        deserialize: Deserializer[T],
        key: str = "state",
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        owner_references: list[dict[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self.namespace = namespace
        self.name = name
        self._serialize = serialize
        self._deserialize = deserialize
        self._key = key
        self._labels = dict(labels or {})
        self._annotations = dict(annotations or {})
        self._owners = list(owner_references or [])
        self._version: str | None = None
        self._clock = clock

    @property
    def where(self) -> str:
        return f"Secret {self.namespace}/{self.name}"

    async def _read(self) -> dict[str, Any] | None:
        try:
            return await self._api.read_secret(self.namespace, self.name)
        except ApiError as exc:
            raise StoreError(f"cannot read {self.where}: HTTP {exc.status} {exc.reason}".rstrip()) from exc

    async def load(self) -> T | None:
        body = await self._read()
        if body is None:
            self._version = None
            return None
        self._version = body.get("metadata", {}).get("resourceVersion")
        encoded = (body.get("data") or {}).get(self._key)
        if not isinstance(encoded, str):
            return None
        try:
            payload = base64.b64decode(encoded, validate=True)
        except ValueError:
            logger.warning("Ignoring an undecodable credential in %s (bad base64); treating it as absent.", self.where)
            return None
        return decode_or_none(self._deserialize, payload, logger=logger, where=self.where)

    def _body(self, data: dict[str, str], annotations: Mapping[str, str] = {}) -> dict[str, Any]:
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": dict(self._labels),
                "annotations": {**self._annotations, **annotations},
            },
            "type": "Opaque",
            "data": data,
        }
        if self._owners:
            body["metadata"]["ownerReferences"] = list(self._owners)
        return body

    def _over(self, current: dict[str, Any], annotations: Mapping[str, str] = {}) -> dict[str, Any]:
        """A replacement of ``current`` with its data as is, conditional on its resourceVersion."""
        body = self._body(dict(current.get("data") or {}), annotations)
        body["metadata"]["resourceVersion"] = current.get("metadata", {}).get("resourceVersion")
        return body

    async def save(self, value: T) -> None:
        payload = self._serialize(value)
        raw = payload.encode() if isinstance(payload, str) else payload
        body = self._body({self._key: base64.b64encode(raw).decode()})
        try:
            if self._version is None:
                try:
                    written = await self._api.create_secret(self.namespace, body)
                except ApiConflictError:
                    # It exists but this store never saw it: that is a conflict too,
                    # unless it is the very Secret we are meant to own (a restart).
                    current = await self._api.read_secret(self.namespace, self.name)
                    if current is None:
                        raise StoreConflictError(f"{self.where} appeared and vanished during a save") from None
                    self._version = current.get("metadata", {}).get("resourceVersion")
                    raise StoreConflictError(f"{self.where} was written by someone else; reload first") from None
            else:
                body["metadata"]["resourceVersion"] = self._version
                written = await self._api.replace_secret(self.namespace, self.name, body)
        except ApiConflictError as exc:
            raise StoreConflictError(f"{self.where} changed since it was read; reload first") from exc
        except ApiNotFoundError:
            self._version = None
            raise StoreConflictError(f"{self.where} was deleted since it was read; reload first") from None
        except ApiError as exc:
            raise StoreError(f"cannot write {self.where}: HTTP {exc.status} {exc.reason}".rstrip()) from exc
        self._version = written.get("metadata", {}).get("resourceVersion")

    async def clear(self) -> None:
        try:
            await self._api.delete_secret(self.namespace, self.name)
        except ApiNotFoundError:
            pass
        except ApiError as exc:
            raise StoreError(f"cannot delete {self.where}: HTTP {exc.status} {exc.reason}".rstrip()) from exc
        self._version = None

    async def acquire(self, *, owner: str, ttl: float, guarding: str = "") -> LeaseGrant:
        # A conflict means the Secret changed between our read and our write: maybe
        # another process leased it, maybe someone only touched a label or an annotation.
        # Read again and decide again (a few times), rather than calling a free lease
        # held and putting the renewal off.
        for _ in range(_LEASE_ATTEMPTS):
            current = await self._read()
            holder = _lease_of(current)
            now = self._clock()
            if holder is not None and holder[0] != owner and holder[1] > now:
                return LeaseGrant(acquired=False)
            interrupted = holder is not None and bool(guarding) and holder[2] == guarding
            record = {"owner": owner, "until": round(now + ttl, 3), "guarding": guarding}
            lease = {LEASE_ANNOTATION: json.dumps(record)}
            try:
                if current is None:
                    written = await self._api.create_secret(self.namespace, self._body({}, lease))
                else:
                    written = await self._api.replace_secret(self.namespace, self.name, self._over(current, lease))
            except (ApiConflictError, ApiNotFoundError):
                continue
            except ApiError as exc:
                raise StoreError(f"cannot lease {self.where}: HTTP {exc.status} {exc.reason}".rstrip()) from exc
            self._version = written.get("metadata", {}).get("resourceVersion")
            return LeaseGrant(acquired=True, interrupted=interrupted)
        return LeaseGrant(acquired=False)  # the Secret keeps changing under us: someone is busy with it

    async def release(self, *, owner: str) -> None:
        current = await self._read()
        holder = _lease_of(current)
        if current is None or holder is None or holder[0] != owner:
            return  # a save already released it, or it expired and is someone else's
        try:
            written = await self._api.replace_secret(self.namespace, self.name, self._over(current))
        except (ApiConflictError, ApiNotFoundError):
            return
        except ApiError as exc:
            raise StoreError(f"cannot release {self.where}: HTTP {exc.status} {exc.reason}".rstrip()) from exc
        self._version = written.get("metadata", {}).get("resourceVersion")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where}, key={self._key!r})"


_LEASE_ATTEMPTS = 3


def _lease_of(body: dict[str, Any] | None) -> tuple[str, float, str] | None:
    """(owner, until, guarding) of the lease annotation; a damaged one counts as free."""
    if body is None:
        return None
    text = ((body.get("metadata") or {}).get("annotations") or {}).get(LEASE_ANNOTATION)
    if not isinstance(text, str):
        return None
    try:
        value = json.loads(text)
        return str(value["owner"]), float(value["until"]), str(value.get("guarding") or "")
    except (ValueError, KeyError, TypeError):
        return None
