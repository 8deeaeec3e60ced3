"""The controller: from observed OAuthCredentials to fresh tokens in Secrets.

Inputs arrive as watch events (:meth:`Controller.observe` for credentials,
:meth:`Controller.observe_secret` for tokensync-labelled Secrets); work runs in
one :class:`~tokensync.controller.schedule.Scheduler`, one credential at a time
per key. Kopf is only the event pump: the handlers layer feeds these methods and
nothing here imports kopf, so the controller is testable on its own.

One reconcile of one credential:

1. Validate-once happened in :meth:`observe`; an invalid spec is reported
   (``Stalled``/``InvalidSpec`` naming the field) and never retried until it
   changes.
2. Load the stored token set. If the spec's fingerprint differs, it belongs to
   another spec and is ignored (a spec change gets a new grant at once).
3. Renew when there is no token, it is due (:func:`refresh_time`), a manual
   refresh was requested, or a watched source Secret changed. Only then are the
   referenced Secrets read; if their values changed, a full grant replaces the
   refresh. A refresh that presents a refresh token first takes the credential's
   lease (:class:`~tokensync.stores.base.AsyncLease`) and reads the store again
   inside it: another process (a replica, another cluster on the same Redis) may
   have just refreshed, and then its token set is used instead of spending the
   refresh token a second time. Saves are compare-and-swap; a lost race adopts
   the winner's token set.
4. Publish the target Secret if its content differs (never a foreign Secret).
5. Write status if it differs, schedule the next run.

A store that is down (Redis) does not stop renewals: the token set held in
memory is refreshed and published, the status says ``StoreUnavailable``, and the
save is retried until the store takes it.

A restart is the same path: the stored token is valid and not due, the target
Secret already matches, the status already matches: no token request and no
write, only a heap entry.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import ssl
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import ValidationError

from tokensync.auth import AsyncTokenManager, AuthProvider, InvalidResponseError, Superseded
from tokensync.auth.discovery import DiscoveryCache
from tokensync.auth.spec import (
    insecure_url_problem,
    is_loopback,
    normalise_secret_value,
    policy_problem,
    provider_from_spec,
    spec_references,
    ssl_context_for_ca,
)
from tokensync.controller.kube import KubeClient
from tokensync.controller.limits import EndpointLimiter
from tokensync.controller.metrics import InstrumentedStore, Metrics
from tokensync.controller.outcomes import (
    InvalidSpecError,
    LeaseHeldError,
    ReferenceMissingError,
    SecretBusyError,
    SecretConflictError,
    classify,
    conditions,
)
from tokensync.controller.schedule import Scheduler, backoff_delay, before_expiry, refresh_time, stable_fraction
from tokensync.controller.secrets import (
    CREDENTIAL_ANNOTATION,
    ROLE_LABEL,
    desired_target,
    is_ours,
    managed_labels,
    merged_for_replace,
    owner_reference,
    secret_differs,
    state_secret_name,
)
from tokensync.models.credential import (
    CredentialSpec,
    DeletionPolicy,
    GrantType,
    OAuthCredential,
    StoreBackend,
)
from tokensync.models.settings import OperatorSettings
from tokensync.models.state import StoredCredential
from tokensync.models.tokens import TokenSet, utcnow
from tokensync.stores.base import AsyncCredentialStore, AsyncLease, LeaseGrant, StoreConflictError, StoreError
from tokensync.stores.kubernetes import ApiConflictError, ApiError, ApiNotFoundError, KubernetesSecretStore

__all__ = [
    "REFRESH_ANNOTATION",
    "Controller",
    "Entry",
    "FingerprintedStore",
    "Key",
    "SecretCache",
    "describe_validation_error",
    "inputs_hash",
    "spec_hash",
]

logger = logging.getLogger("tokensync.controller")

Key = tuple[str, str]  # (namespace, name)
REFRESH_ANNOTATION = "tokensync.dev/refresh-requested-at"
#: Seconds between looks at another process's lease, at least: a read of the store
#: and a lease attempt each time, never an IdP request.
LEASE_POLL_MIN = 0.25

StoreFactory = Callable[[OAuthCredential], AsyncCredentialStore[StoredCredential]]


def _tag(secret: str | None) -> str:
    """What a lease records of the refresh token it guards: enough to recognise it, not to use it."""
    return hashlib.sha256(b"lease\0" + (secret or "").encode()).hexdigest()[:32] if secret else ""


def _older(body: dict[str, Any], than: dict[str, Any]) -> bool:
    """Whether ``body`` is an older version of the object ``than`` is.

    resourceVersions are opaque by contract, but every etcd-backed API server (and
    the emulator) issues increasing integers; anything else is never called older.
    """
    mine = (body.get("metadata") or {}).get("resourceVersion")
    theirs = (than.get("metadata") or {}).get("resourceVersion")
    if not (isinstance(mine, str) and isinstance(theirs, str) and mine.isdigit() and theirs.isdigit()):
        return False
    return int(mine) < int(theirs)


def _stamp(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def _parse_stamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def describe_validation_error(error: ValidationError) -> str:
    """Field paths and messages only: pydantic's default text quotes the input values."""
    parts = []
    for item in error.errors(include_url=False, include_input=False, include_context=False)[:5]:
        path = ".".join(str(p) for p in item.get("loc", ()) if p != "__root__")
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{path}: {message}" if path else message)
    return "; ".join(parts)


def spec_hash(spec: CredentialSpec) -> str:
    """Fingerprint of the non-secret inputs of a grant: issuer and grant settings."""
    material = {
        "issuer": spec.issuer.model_dump(mode="json", by_alias=True, exclude_none=True),
        "grant": spec.grant.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def bootstrap_hash(spec: CredentialSpec, values: dict[str, str]) -> str:
    """Fingerprint of the bootstrap refresh token alone (empty for other grants)."""
    value = values.get("grant.refreshTokenRef")
    if spec.grant.type != GrantType.REFRESH_TOKEN or value is None:
        return ""
    return hashlib.sha256(b"bootstrap\0" + value.encode()).hexdigest()


def inputs_hash(spec_fingerprint: str, values: dict[str, str]) -> str:
    digest = hashlib.sha256(spec_fingerprint.encode())
    for path in sorted(values):
        digest.update(b"\0" + path.encode() + b"\0" + values[path].encode())
    return digest.hexdigest()


class FingerprintedStore:
    """Adapts a store of :class:`StoredCredential` to what a token manager needs.

    A stored token set made from other inputs reads as absent, and every save
    records the inputs it was made from.
    """

    def __init__(
        self, inner: AsyncCredentialStore[StoredCredential], spec_fp: str, inputs_fp: str, bootstrap_fp: str = ""
    ) -> None:
        self._inner = inner
        self._spec = spec_fp
        self._inputs = inputs_fp
        self._bootstrap = bootstrap_fp

    async def load(self) -> TokenSet | None:
        stored = await self._inner.load()
        if stored is None or stored.spec_hash != self._spec or stored.inputs_hash != self._inputs:
            return None
        return stored.token_set

    async def save(self, value: TokenSet) -> None:
        stored = StoredCredential(
            token_set=value, spec_hash=self._spec, inputs_hash=self._inputs, bootstrap_hash=self._bootstrap
        )
        try:
            await self._inner.save(stored)
        except StoreConflictError:
            # Someone wrote since we read. A usable token set of the same inputs
            # issued after ours is another process's win: adopt it. Anything else
            # (older inputs, an expired set, or the very set ours was renewed from,
            # seen through a stale read) is replaced by ours on a fresh read: dropping
            # ours would lose the refresh token its renewal just rotated to.
            current = await self._inner.load()
            if (
                current is not None
                and current.spec_hash == self._spec
                and current.inputs_hash == self._inputs
                and current.token_set.access_valid()
                and current.token_set.issued_at > value.issued_at
            ):
                raise Superseded(current.token_set) from None
            await self._inner.save(stored)

    async def clear(self) -> None:
        await self._inner.clear()


@dataclass
class Entry:
    """What the controller remembers of one credential between events."""

    key: Key
    uid: str = ""
    generation: int | None = None
    credential: OAuthCredential | None = None
    invalid: str | None = None
    status: dict[str, Any] = field(default_factory=dict)
    refresh_request: str | None = None
    # Source-Secret changes seen vs handled: a counter, not a flag, so a change
    # arriving while an attempt runs is not cleared by that attempt's success.
    inputs_changes: int = 0
    inputs_handled: int = 0
    failed_attempts: int = 0
    store: AsyncCredentialStore[StoredCredential] | None = None
    manager: AsyncTokenManager | None = None
    manager_key: tuple[str, str] | None = None
    #: The target Secret's resourceVersion as this process last wrote or checked it;
    #: None until its first run got that far.
    written_target_version: str | None = None
    # What the running attempt works on, fixed when it starts: observe() may change
    # generation and refresh_request meanwhile, and the status must describe the
    # attempt, not the latest event (or a new request would be marked handled unseen).
    attempt_generation: int | None = None
    attempt_request: str | None = None
    store_backend: StoreBackend | None = None
    lease: AsyncLease | None = None
    sources: frozenset[Key] = frozenset()


class SecretCache:
    """The tokensync-labelled Secrets, as last seen from the watch or our own writes.

    Once :attr:`synced` (after the startup LIST), a miss means "absent": reads of
    state Secrets then cost no API call, which is what makes a restart with ten
    thousand credentials one LIST instead of ten thousand GETs. A write that fails
    makes its key *stale*: the cache no longer knows the truth for it, so the
    next read asks the API (a failed PUT leaves no watch event to repair it).
    """

    def __init__(self, client: KubeClient) -> None:
        self._client = client
        self._items: dict[Key, dict[str, Any]] = {}
        self._stale: set[Key] = set()
        self.synced = False

    def __len__(self) -> int:
        return len(self._items)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._items.get((namespace, name))

    def put(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        known = self._items.get(key)
        if known is not None and _older(body, known):
            # A watch event can arrive after the answer to our own later write: keeping
            # it would make the next compare-and-swap fail on a version long gone.
            return
        self._items[key] = body
        self._stale.discard(key)

    def drop(self, namespace: str, name: str) -> None:
        self._items.pop((namespace, name), None)

    def _unknown(self, namespace: str, name: str) -> None:
        self._items.pop((namespace, name), None)
        self._stale.add((namespace, name))

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        key = (namespace, name)
        hit = self._items.get(key)
        if hit is not None or (self.synced and key not in self._stale):
            return hit
        body = await self._client.read_secret(namespace, name)
        if body is not None and ROLE_LABEL in ((body.get("metadata") or {}).get("labels") or {}):
            self.put(body)
        elif body is None:
            self._stale.discard(key)
        return body

    async def create_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            written = await self._client.create_secret(namespace, body)
        except ApiError:
            self._unknown(namespace, body["metadata"]["name"])
            raise
        self.put(written)
        return written

    async def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            written = await self._client.replace_secret(namespace, name, body)
        except ApiError:
            self._unknown(namespace, name)
            raise
        self.put(written)
        return written

    async def delete_secret(self, namespace: str, name: str) -> None:
        try:
            await self._client.delete_secret(namespace, name)
        except ApiNotFoundError:
            self.drop(namespace, name)
            raise
        except ApiError:
            self._unknown(namespace, name)
            raise
        self.drop(namespace, name)

    async def prime(self, namespaces: list[str]) -> None:
        """One labelled LIST per watched scope, before any credential is reconciled."""
        for namespace in namespaces or [None]:  # type: ignore[list-item]
            for body in await self._client.list_secrets(namespace, label_selector=ROLE_LABEL):
                self.put(body)
        self.synced = True


class Controller:
    """Keeps every observed OAuthCredential's target Secret fresh."""

    def __init__(
        self,
        *,
        kube: KubeClient,
        settings: OperatorSettings,
        http: httpx.AsyncClient | None = None,
        redis_store_factory: StoreFactory | None = None,
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.secrets = SecretCache(kube)
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(10.0), event_hooks=self.metrics.http_hooks())
        self._owns_http = http is None
        self._ca_clients: dict[str, httpx.AsyncClient] = {}
        self._redis_store_factory = redis_store_factory
        self._clock = clock
        self._entries: dict[Key, Entry] = {}
        self._sources: dict[Key, set[Key]] = {}
        #: resourceVersion of each watched source Secret when last seen, to tell a listing
        #: that repeats what was seen from one that shows a change made while unwatched.
        self._source_versions: dict[Key, str | None] = {}
        self._discovery = DiscoveryCache(ttl=settings.discovery_ttl)
        self.limiter = EndpointLimiter(
            concurrency=settings.endpoint_concurrency, rate=settings.endpoint_rate, burst=settings.endpoint_burst
        )
        self.scheduler = Scheduler(self._run, concurrency=settings.concurrency, clock=lambda: self._clock().timestamp())
        self.token_requests = 0
        self._background: set[asyncio.Task[None]] = set()
        self._clear_after_run: dict[Key, AsyncCredentialStore[StoredCredential]] = {}

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        await self.secrets.prime(self.settings.namespaces)

    async def run(self) -> None:
        await self.scheduler.run()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for client in self._ca_clients.values():
            await client.aclose()
        if self._owns_http:
            await self._http.aclose()

    @property
    def entries(self) -> dict[Key, Entry]:
        return self._entries

    # -- events ---------------------------------------------------------------------

    def observe(self, body: dict[str, Any], event_type: str | None) -> None:
        """A credential was listed, added, modified or deleted."""
        meta = body.get("metadata") or {}
        key: Key = (meta.get("namespace") or "default", meta.get("name") or "")
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self._forget(key)
            return
        entry = self._entries.get(key)
        if entry is not None and entry.uid and meta.get("uid") and meta.get("uid") != entry.uid:
            self._forget(key)  # a new object under an old name: nothing of the old one applies
            entry = None
        fresh = entry is None
        if entry is None:
            entry = self._entries[key] = Entry(key=key)
            entry.status = dict(body.get("status") or {})
            entry.failed_attempts = int(entry.status.get("failedAttempts") or 0)
        generation = meta.get("generation")
        generation_changed = not fresh and generation != entry.generation
        refresh_request = (meta.get("annotations") or {}).get(REFRESH_ANNOTATION)
        # A request is new when its value was not seen before (or, at startup, not
        # yet handled). Comparing with status on every event would re-trigger on
        # our own status writes while a requested refresh is being retried.
        seen = entry.status.get("handledRefreshRequest") if fresh else entry.refresh_request
        requested = refresh_request is not None and refresh_request != seen
        if not (fresh or generation_changed or requested or meta.get("uid", "") != entry.uid):
            return
        entry.uid = meta.get("uid", "")
        entry.generation = generation
        entry.refresh_request = refresh_request
        if generation_changed:
            entry.failed_attempts = 0
        try:
            entry.credential = OAuthCredential.model_validate(body)
            entry.invalid = None
        except ValidationError as exc:
            entry.credential = None
            entry.invalid = describe_validation_error(exc)
        self._index_sources(entry)
        when = self._clock().timestamp()
        if fresh and entry.failed_attempts and entry.status.get("observedGeneration") == generation:
            # A restart during a failure streak: keep the backoff, do not hammer the IdP.
            last = _parse_stamp(entry.status.get("lastFailureTime"))
            if last is not None:
                when = max(when, last.timestamp() + self._backoff_delay(entry, now=last))
            # The retry that process planned also holds an IdP's Retry-After, which the
            # backoff alone forgets. Stamps are whole seconds, rounded down.
            planned = _parse_stamp(entry.status.get("nextRefreshTime"))
            if planned is not None:
                when = max(when, planned.timestamp() + 1)
        self.scheduler.schedule(key, when)

    def observe_secret(self, body: dict[str, Any], event_type: str | None) -> None:
        """A tokensync-labelled Secret (target, state or opted-in source) changed."""
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        role = (meta.get("labels") or {}).get(ROLE_LABEL)
        if event_type == "DELETED":
            self.secrets.drop(namespace, name)
        elif role in ("target", "state"):
            self.secrets.put(body)
        # A listing (event_type None: a start, or a watch that reconnected) says what
        # exists, not what changed. What this process has not looked at yet, its
        # pending run looks at anyway; running it now would jump a failure
        # streak's backoff (and an IdP's Retry-After) on every restart.
        listing = event_type is None
        if role == "target":
            owner = (meta.get("annotations") or {}).get(CREDENTIAL_ANNOTATION)
            entry = self._entries.get((namespace, owner)) if owner else None
            if entry is None or (listing and entry.written_target_version is None):
                return
            if event_type == "DELETED" or meta.get("resourceVersion") != entry.written_target_version:
                self.scheduler.run_now(entry.key)  # someone else edited or deleted it: repair
        elif role == "source" or (namespace, name) in self._sources:
            version = meta.get("resourceVersion")
            seen = self._source_versions.pop((namespace, name), None)
            if event_type != "DELETED":
                self._source_versions[(namespace, name)] = version
            if listing and seen in (None, version):
                return
            for key in self._sources.get((namespace, name), ()):
                entry = self._entries.get(key)
                if entry is not None:
                    entry.inputs_changes += 1
                    self.scheduler.run_now(key)

    def _forget(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        self.scheduler.cancel(key)
        self.metrics.forget(key)
        if entry is None:
            return
        for source in entry.sources:
            self._sources.get(source, set()).discard(key)
        if entry.credential is not None and self._backend(entry.credential) == StoreBackend.REDIS:
            store = entry.store or self._store(entry.credential)
            if self.scheduler.running(key):
                self._clear_after_run[key] = store  # a save in flight would write it back
                return
            task = asyncio.get_running_loop().create_task(self._clear_quietly(store, key))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        # Secrets of the Secret backend and Delete-policy targets are owned by the
        # credential: the API server's garbage collector removes them, even when
        # the operator is not running. No finalizer needed, so deletion never hangs.

    @staticmethod
    async def _clear_quietly(store: AsyncCredentialStore[StoredCredential], key: Key) -> None:
        try:
            await store.clear()
        except Exception as exc:
            logger.warning("could not clear the stored tokens of %s/%s: %s", *key, classify(exc).message)

    def _index_sources(self, entry: Entry) -> None:
        for source in entry.sources:
            self._sources.get(source, set()).discard(entry.key)
        sources: set[Key] = set()
        if entry.credential is not None:
            sources = {(entry.key[0], ref.name) for ref in spec_references(entry.credential.spec).values()}
        for source in sources:
            self._sources.setdefault(source, set()).add(entry.key)
        entry.sources = frozenset(sources)

    # -- one reconcile ------------------------------------------------------------------

    async def _run(self, key: Hashable) -> None:
        entry = self._entries.get(key) if isinstance(key, tuple) else None
        if entry is None:
            return
        now = self._clock()
        entry.attempt_generation, entry.attempt_request = entry.generation, entry.refresh_request
        if entry.credential is None:
            self.metrics.credential_failing(entry.key, ready=False)
            await self._write_status(entry, self._failure_status(entry, InvalidSpecError(entry.invalid or ""), now))
            return
        try:
            await self._reconcile(entry, entry.credential, now)
        except Exception as exc:
            # Backoff and Retry-After count from the failure, not from the start of
            # the attempt: a slow 429 would otherwise be retried early (RFC 9110 10.2.3).
            await self._failed(entry, exc, self._clock())
        finally:
            leftover = self._clear_after_run.pop(entry.key, None)
            if leftover is not None:
                await self._clear_quietly(leftover, entry.key)

    async def _reconcile(self, entry: Entry, credential: OAuthCredential, now: datetime) -> None:
        spec = credential.spec
        self._check_urls(credential)
        store = await self._current_store(entry, credential)
        spec_fp = spec_hash(spec)
        store_problem: Exception | None = None
        try:
            raw = await store.load()
        except StoreError as exc:
            # The store is down. A token set this process holds for this spec carries on.
            raw = self._held(entry, spec_fp)
            if raw is None:
                raise
            store_problem = exc
        stored = raw if raw is not None and raw.spec_hash == spec_fp else None
        token_set = stored.token_set if stored is not None else None
        identity = entry.uid or f"{entry.key[0]}/{entry.key[1]}"
        refresh = spec.effective_refresh()
        skew = self.settings.expiry_skew
        forced = entry.attempt_request is not None and entry.attempt_request != entry.status.get(
            "handledRefreshRequest"
        )
        jitter = self.settings.jitter_fraction
        due = token_set is None or not token_set.access_valid(skew, now=now)
        if token_set is not None and not due:
            due = now >= refresh_time(token_set, refresh, identity=identity, jitter_fraction=jitter)
        renewed = False
        retry_at: datetime | None = None
        lease_wait = False  # another process is refreshing: only its result is worth a look
        inputs_seen = entry.inputs_changes
        if due or forced or inputs_seen != entry.inputs_handled:
            values = await self._resolve(credential)
            inputs_fp = inputs_hash(spec_fp, values)
            bootstrap_fp = bootstrap_hash(spec, values)
            changed_inputs = stored is None or stored.inputs_hash != inputs_fp
            same_chain = raw is not None and bool(bootstrap_fp) and raw.bootstrap_hash == bootstrap_fp
            if changed_inputs and same_chain and raw is not None and raw.token_set.refresh_token is not None:
                # Same bootstrap token: continue the stored chain under the new inputs.
                with contextlib.suppress(Superseded):  # a winner's chain of these inputs: the refresh reloads it
                    await FingerprintedStore(store, spec_fp, inputs_fp, bootstrap_fp).save(raw.token_set)
                stored = StoredCredential(
                    token_set=raw.token_set, spec_hash=spec_fp, inputs_hash=inputs_fp, bootstrap_hash=bootstrap_fp
                )
                token_set = raw.token_set  # the chain's refresh token is what the renewal presents
                changed_inputs, due = False, True
            if due or forced or changed_inputs:
                token_url = await self._token_url(credential, values)
                manager = self._manager(entry, credential, values, spec_fp, inputs_fp, bootstrap_fp, token_url)
                presented = self._presented_refresh_token(spec, token_set, values, changed_inputs)
                async with self.limiter.slot(token_url):
                    lease = entry.lease if presented is not None else None
                    grant = (
                        None
                        if lease is None
                        else await self._take_lease(lease, token_set, now, guarding=_tag(presented))
                    )
                    if grant is not None and not grant.acquired:
                        # Someone else is refreshing: read their result soon instead.
                        if token_set is None or not token_set.access_valid(skew, now=now):
                            raise LeaseHeldError("another operator process is refreshing this credential")
                        lease_wait = True
                        # Look again before the token pods hold runs out: the holder
                        # usually finishes in well under a second.
                        left = (
                            (token_set.expires_at - now).total_seconds() if token_set.expires_at is not None else None
                        )
                        wait = before_expiry(2 + 2 * stable_fraction("lease", identity), left, floor=LEASE_POLL_MIN)
                        retry_at = self._clock() + timedelta(seconds=wait)
                    else:
                        try:
                            fresher = await self._fresher(store, stored, spec_fp, inputs_fp) if grant else None
                            if (
                                fresher is not None
                                and not forced
                                and now < refresh_time(fresher, refresh, identity=identity, jitter_fraction=jitter)
                            ):
                                token_set = fresher  # the other process's refresh; nothing to spend
                            else:
                                interrupted = grant is not None and grant.interrupted and not changed_inputs
                                if interrupted and stored is not None:
                                    await self._spend_interrupted(entry, store, stored, manager)
                                self.token_requests += 1
                                token_set = await (manager.token() if changed_inputs else manager.force_refresh())
                                renewed = True
                        finally:
                            if grant and lease is not None:
                                await self._release_lease(lease)
                if manager.pending_save:
                    store_problem = manager.store_error or StoreError("the store has not taken the new token set yet")
                if renewed and not token_set.access_valid(now=self._clock()):
                    # Retrying at once would loop: back off like any bad answer.
                    raise InvalidResponseError(
                        "the identity provider issued a token that is already expired "
                        "(check its clock and the expires_in it sends)"
                    )
        assert token_set is not None
        secret_name = await self._publish(entry, credential, token_set)
        next_at = refresh_time(token_set, refresh, identity=identity, jitter_fraction=jitter)
        recovered = entry.failed_attempts > 0 and store_problem is None
        degraded: tuple[str, str] | None = None
        if store_problem is not None:
            entry.failed_attempts += 1
            retry = self._clock() + timedelta(seconds=self._backoff_delay(entry))
            retry_at = min(retry, retry_at) if retry_at is not None else retry
            degraded = ("StoreUnavailable", f"serving the token held in memory; {classify(store_problem).message}")
            logger.warning("%s/%s: %s (retry at %s)", *entry.key, degraded[1], _stamp(retry_at))
        else:
            entry.failed_attempts = 0
        if lease_wait and retry_at is not None:
            # The refresh time is already past (that is why we wanted the lease):
            # min() with it would run again at once, in a loop against the store,
            # for as long as the holder takes, or its TTL if it died.
            next_at = retry_at
        elif retry_at is not None:
            next_at = min(next_at, retry_at)
        entry.inputs_handled = inputs_seen  # only now: a failed grant must not forget that inputs changed
        status = self._success_status(
            entry,
            credential,
            token_set,
            secret_name,
            next_at,
            renewed=renewed,
            forced=forced,
            now=now,
            degraded=degraded,
        )
        first = (
            not entry.status.get("lastRefreshTime")
            or entry.status.get("observedGeneration") != entry.attempt_generation
        )
        await self._write_status(entry, status)
        if renewed and (first or recovered):
            await self._event(
                credential,
                "Normal",
                "Recovered" if recovered else "TokenIssued",
                f"access token issued by the {spec.grant.type.value} grant into Secret {secret_name}, "
                f"expires {_stamp(token_set.expires_at) or 'at an unknown time'}",
            )
        if degraded is not None and entry.failed_attempts == 1:
            await self._event(credential, "Warning", degraded[0], degraded[1])
        self.metrics.credential_ok(entry.key, token_set.expires_at.timestamp() if token_set.expires_at else None)
        if renewed:
            self.metrics.renewed()
        self.scheduler.schedule(entry.key, next_at.timestamp())

    # -- cross-process safety -------------------------------------------------------

    def _held(self, entry: Entry, spec_fp: str) -> StoredCredential | None:
        """The token set this process holds in memory for this spec, as if it were stored."""
        manager = entry.manager
        if manager is None or manager.token_set is None or entry.manager_key is None:
            return None
        if entry.manager_key[0] != spec_fp:
            return None
        return StoredCredential(token_set=manager.token_set, spec_hash=spec_fp, inputs_hash=entry.manager_key[1])

    @staticmethod
    def _presented_refresh_token(
        spec: CredentialSpec, token_set: TokenSet | None, values: dict[str, str], changed_inputs: bool
    ) -> str | None:
        """The refresh token this renewal will present, if any: what the lease must guard."""
        if not changed_inputs and token_set is not None and token_set.refresh_token is not None:
            return token_set.refresh_token.get_secret_value()
        if spec.grant.type == GrantType.REFRESH_TOKEN:
            # A first grant from refreshTokenRef presents the bootstrap token: two
            # clusters starting together on one Redis would both spend it.
            return values.get("grant.refreshTokenRef")
        return None

    async def _take_lease(
        self, lease: AsyncLease, token_set: TokenSet | None, now: datetime, *, guarding: str
    ) -> LeaseGrant | None:
        """The lease, or None when the store is down and the renewal should go on without it.

        Without the store nobody can take the lease, so a refresh without it risks
        what the lease prevents; it is only worth that when the token would
        otherwise expire before the next retry.
        """
        try:
            return await lease.acquire(owner=self.settings.identity, ttl=self.settings.lease_ttl, guarding=guarding)
        except StoreError:
            horizon = now + timedelta(seconds=self.settings.expiry_skew + 2 * self.settings.backoff_initial)
            if token_set is not None and token_set.access_valid(now=horizon):
                raise
            return None

    async def _spend_interrupted(
        self,
        entry: Entry,
        store: AsyncCredentialStore[StoredCredential],
        stored: StoredCredential,
        manager: AsyncTokenManager,
    ) -> None:
        """A holder died presenting this refresh token; its answer (and maybe a rotation) is lost.

        Presenting it again would be a reuse, and servers with reuse protection
        then revoke the whole family. A credential that can log in again records
        it as spent first, exactly as after a lost response; one that cannot
        (a bootstrap refresh token) has nothing better and presents it.
        """
        if stored.token_set.refresh_token is None or not manager.provider.can_reauthenticate:
            return
        logger.warning("%s/%s: a refresh was interrupted (operator restart); not reusing its refresh token", *entry.key)
        spent = stored.token_set.model_copy(update={"refresh_token": None, "refresh_expires_at": None})
        with contextlib.suppress(Superseded):
            await FingerprintedStore(store, stored.spec_hash, stored.inputs_hash, stored.bootstrap_hash).save(spent)

    async def _release_lease(self, lease: AsyncLease) -> None:
        try:
            await lease.release(owner=self.settings.identity)
        except StoreError as exc:
            logger.info("cannot release a lease (it expires by itself): %s", exc)

    async def _fresher(
        self,
        store: AsyncCredentialStore[StoredCredential],
        stored: StoredCredential | None,
        spec_fp: str,
        inputs_fp: str,
    ) -> TokenSet | None:
        """Inside the lease: a token set another process stored after ours was read."""
        current = await store.load()
        if current is None or current.spec_hash != spec_fp or current.inputs_hash != inputs_fp:
            return None
        if stored is not None and current.token_set.issued_at <= stored.token_set.issued_at:
            return None
        return current.token_set

    # -- pieces -----------------------------------------------------------------------

    async def _current_store(self, entry: Entry, credential: OAuthCredential) -> AsyncCredentialStore[StoredCredential]:
        """The entry's store; when ``store.backend`` changed, the stored value moves along."""
        backend = self._backend(credential)
        if entry.store is not None and entry.store_backend == backend:
            return entry.store
        raw = self._raw_store(credential, backend)
        new = InstrumentedStore(raw, self.metrics, backend.value)
        if entry.store is not None:
            value = await entry.store.load()
            if value is not None:
                await new.save(value)
            await entry.store.clear()
            entry.manager = None
        entry.store, entry.store_backend = new, backend
        entry.lease = raw if isinstance(raw, AsyncLease) else None
        return new

    def _backend(self, credential: OAuthCredential) -> StoreBackend:
        return credential.spec.effective_backend(self.settings.default_store)

    def _store(self, credential: OAuthCredential) -> AsyncCredentialStore[StoredCredential]:
        backend = self._backend(credential)
        return InstrumentedStore(self._raw_store(credential, backend), self.metrics, backend.value)

    def _raw_store(self, credential: OAuthCredential, backend: StoreBackend) -> AsyncCredentialStore[StoredCredential]:
        if backend == StoreBackend.REDIS:
            if self._redis_store_factory is None:
                raise InvalidSpecError("store.backend is redis, but the operator has no Redis configured")
            return self._redis_store_factory(credential)
        return KubernetesSecretStore(
            self.secrets,
            namespace=credential.metadata.namespace,
            name=state_secret_name(credential.metadata.name),
            serialize=StoredCredential.to_json,
            deserialize=StoredCredential.from_json,
            labels=managed_labels("state"),
            annotations={CREDENTIAL_ANNOTATION: credential.metadata.name},
            owner_references=[owner_reference(credential)],
        )

    def _check_urls(self, credential: OAuthCredential) -> None:
        issuer = credential.spec.issuer
        problem = insecure_url_problem(issuer, allow_insecure_http=self.settings.allow_insecure_http)
        prefixes = self.settings.url_prefixes_for(credential.metadata.namespace)
        for path, url in (("issuer.tokenURL", issuer.token_url), ("issuer.issuerURL", issuer.issuer_url)):
            if problem is None and url is not None:
                problem = policy_problem(path, url, prefixes)
        if problem is not None:
            raise InvalidSpecError(problem)

    async def _resolve(self, credential: OAuthCredential) -> dict[str, str]:
        """The values of every referenced Secret key, by spec path. Read fresh each time."""
        namespace = credential.metadata.namespace
        refs = spec_references(credential.spec)
        bodies: dict[str, dict[str, Any] | None] = {}
        values: dict[str, str] = {}
        for path, ref in refs.items():
            if ref.name not in bodies:
                bodies[ref.name] = await self.kube.read_secret(namespace, ref.name)
            body = bodies[ref.name]
            if body is None:
                raise ReferenceMissingError(f"{path}: Secret {ref.name} not found in namespace {namespace}")
            encoded = (body.get("data") or {}).get(ref.key)
            if encoded is None:
                raise ReferenceMissingError(f"{path}: Secret {ref.name} has no key {ref.key}")
            try:
                value = base64.b64decode(encoded, validate=True).decode()
            except (binascii.Error, ValueError, UnicodeDecodeError):
                raise InvalidSpecError(f"{path}: Secret {ref.name} key {ref.key} is not UTF-8 text") from None
            values[path] = normalise_secret_value(value)
        return values

    def _provider(self, credential: OAuthCredential, values: dict[str, str]) -> AuthProvider:
        try:
            return provider_from_spec(credential.spec.grant, values)
        except ValueError as exc:
            raise InvalidSpecError(str(exc)) from None

    def _manager(
        self,
        entry: Entry,
        credential: OAuthCredential,
        values: dict[str, str],
        spec_fp: str,
        inputs_fp: str,
        bootstrap_fp: str,
        token_url: str,
    ) -> AsyncTokenManager:
        # The manager lives as long as its inputs: it keeps a rotated token set
        # in memory if the store refuses it, and retries the save before use.
        if entry.manager is None or entry.manager_key != (spec_fp, inputs_fp) or entry.manager.token_url != token_url:
            assert entry.store is not None
            entry.manager = AsyncTokenManager(
                self._provider(credential, values),
                http=self._http_for(credential, values),
                token_url=token_url,
                store=FingerprintedStore(entry.store, spec_fp, inputs_fp, bootstrap_fp),
                expiry_skew=self.settings.expiry_skew,
                serve_unsaved=True,
            )
            entry.manager_key = (spec_fp, inputs_fp)
        return entry.manager

    def _http_for(self, credential: OAuthCredential, values: dict[str, str]) -> httpx.AsyncClient:
        ca = values.get("issuer.caSecretRef")
        timeout = credential.spec.issuer.effective_timeout()
        if ca is None and timeout == 10.0:
            return self._http
        cache_key = hashlib.sha256(f"{timeout}\0{ca or ''}".encode()).hexdigest()
        client = self._ca_clients.get(cache_key)
        if client is None:
            verify: ssl.SSLContext | bool = True
            if ca is not None:
                try:
                    verify = ssl_context_for_ca(ca)
                except ValueError as exc:
                    raise InvalidSpecError(str(exc)) from None
            client = self._ca_clients[cache_key] = httpx.AsyncClient(
                verify=verify, timeout=httpx.Timeout(timeout), event_hooks=self.metrics.http_hooks()
            )
        return client

    async def _token_url(self, credential: OAuthCredential, values: dict[str, str]) -> str:
        issuer = credential.spec.issuer
        if issuer.token_url is not None:
            return issuer.token_url
        assert issuer.issuer_url is not None
        # Discovery goes through the same client as the token request: a private CA
        # (issuer.caSecretRef) and the spec's timeout apply to both.
        endpoint = await self._discovery.token_endpoint(self._http_for(credential, values), issuer.issuer_url)
        # A discovery document is the issuer's word, not the operator's: the endpoint
        # it names must pass the same policy, or an issuer could point the operator
        # (and the client secret) at an internal address.
        prefixes = self.settings.url_prefixes_for(credential.metadata.namespace)
        problem = policy_problem("the discovered token_endpoint", endpoint, prefixes)
        parts = urlsplit(endpoint)
        plain = parts.scheme == "http" and not self.settings.allow_insecure_http and not is_loopback(parts.hostname)
        if problem is None and plain:
            problem = "the discovered token_endpoint uses plain http"
        if problem is not None:
            raise InvalidSpecError(problem)
        return endpoint

    async def _publish(self, entry: Entry, credential: OAuthCredential, token_set: TokenSet) -> str:
        """Create or update the target Secret; returns its name. Never touches a foreign Secret."""
        desired = desired_target(credential, token_set)
        namespace, name = credential.metadata.namespace, str(desired["metadata"]["name"])
        if name == state_secret_name(credential.metadata.name):
            raise InvalidSpecError(f"target.secretName {name} is reserved for tokensync's own state Secret")
        actual = self.secrets.get(namespace, name)
        for _ in range(3):
            try:
                if actual is None:
                    written = await self.secrets.create_secret(namespace, desired)
                else:
                    if not is_ours(actual, credential.metadata.name):
                        raise SecretConflictError(
                            f"Secret {name} exists and was not created by tokensync for this credential; "
                            "delete it or choose another target.secretName"
                        )
                    if not secret_differs(actual, desired):
                        entry.written_target_version = (actual.get("metadata") or {}).get("resourceVersion")
                        break
                    if (actual.get("type") or "Opaque") != desired["type"]:
                        await self.secrets.delete_secret(namespace, name)  # type is immutable
                        written = await self.secrets.create_secret(namespace, desired)
                    else:
                        written = await self.secrets.replace_secret(
                            namespace, name, merged_for_replace(actual, desired)
                        )
                entry.written_target_version = (written.get("metadata") or {}).get("resourceVersion")
                break
            except (ApiConflictError, ApiNotFoundError):
                actual = await self.kube.read_secret(namespace, name)  # lost a race: look again
        else:
            raise SecretBusyError(f"Secret {name} keeps changing under tokensync; retrying later")
        await self._retire_previous_target(entry, credential, name)
        return name

    async def _retire_previous_target(self, entry: Entry, credential: OAuthCredential, name: str) -> None:
        previous = entry.status.get("secretName")
        if not previous or previous == name:
            return
        policy = credential.spec.effective_target().deletion_policy or DeletionPolicy.DELETE
        old = self.secrets.get(credential.metadata.namespace, previous)
        if policy == DeletionPolicy.DELETE and old is not None and is_ours(old, credential.metadata.name):
            with contextlib.suppress(ApiNotFoundError):
                await self.secrets.delete_secret(credential.metadata.namespace, previous)

    # -- status ------------------------------------------------------------------------

    def _success_status(
        self,
        entry: Entry,
        credential: OAuthCredential,
        token_set: TokenSet,
        secret_name: str,
        next_at: datetime,
        *,
        renewed: bool,
        forced: bool,
        now: datetime,
        degraded: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        previous = entry.status
        expires = _stamp(token_set.expires_at) or "an unknown time"
        count = int(previous.get("refreshCount") or 0) + (1 if renewed else 0)
        return {
            "observedGeneration": entry.attempt_generation,
            "conditions": conditions(
                previous.get("conditions"),
                ready=(True, "TokenIssued", f"Secret {secret_name} holds a token valid until {expires}"),
                reconciling=(True, *degraded) if degraded else None,
                stalled=None,
                generation=entry.attempt_generation,
                now=now,
            ),
            "secretName": secret_name,
            "expiresAt": _stamp(token_set.expires_at),
            "refreshTokenExpiresAt": _stamp(token_set.refresh_expires_at),
            "lastRefreshTime": _stamp(token_set.issued_at),
            "nextRefreshTime": _stamp(next_at),
            "failedAttempts": entry.failed_attempts,
            "lastFailureTime": _stamp(now) if degraded else None,
            "grantedScopes": token_set.scope.split() if token_set.scope else None,
            "refreshCount": count,
            "handledRefreshRequest": entry.attempt_request if forced else previous.get("handledRefreshRequest"),
        }

    def _failure_status(
        self, entry: Entry, exc: BaseException, now: datetime, next_at: datetime | None = None
    ) -> dict[str, Any]:
        outcome = classify(exc)
        previous = entry.status
        expires = _parse_stamp(previous.get("expiresAt"))
        # The Secret still serves this spec only if Ready was True *for this
        # generation*: after a spec change the old token belongs to the old spec.
        ready_before: dict[str, Any] = next(
            (c for c in previous.get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        spec_current = (
            ready_before.get("status") == "True" and ready_before.get("observedGeneration") == entry.attempt_generation
        )
        still_valid = not outcome.permanent and spec_current and expires is not None and expires > now
        if still_valid:
            ready = (True, "TokenIssued", f"token valid until {_stamp(expires)}; renewal failing: {outcome.message}")
        else:
            ready = (False, outcome.reason, outcome.message)
        return {
            **previous,
            "observedGeneration": entry.attempt_generation,
            "conditions": conditions(
                previous.get("conditions"),
                ready=ready,
                reconciling=None if outcome.permanent else (True, outcome.reason, outcome.message),
                stalled=(True, outcome.reason, outcome.message) if outcome.permanent else None,
                generation=entry.attempt_generation,
                now=now,
            ),
            "failedAttempts": entry.failed_attempts,
            "lastFailureTime": _stamp(now),
            "nextRefreshTime": _stamp(next_at),
            # A requested refresh that failed transiently is still owed: it is only
            # handled when it succeeds, or fails in a way retrying cannot fix.
            "handledRefreshRequest": entry.attempt_request
            if outcome.permanent
            else previous.get("handledRefreshRequest"),
        }

    async def _failed(self, entry: Entry, exc: Exception, now: datetime) -> None:
        outcome = classify(exc)
        if outcome.reason == "InternalError":
            logger.exception("reconciling %s/%s failed unexpectedly", *entry.key)
        entry.failed_attempts += 1
        next_at: datetime | None = None
        if outcome.reason == "SecretConflict":
            # The foreign Secret is not watched (it is not ours), so nobody would
            # tell us when its owner deletes it: look again now and then.
            next_at = now + timedelta(seconds=self.settings.backoff_max)
            self.scheduler.schedule(entry.key, next_at.timestamp())
        elif not outcome.permanent:
            next_at = now + timedelta(seconds=self._backoff_delay(entry, outcome.retry_after, now=now))
            self.scheduler.schedule(entry.key, next_at.timestamp())
        logger.warning(
            "%s/%s: %s (%s, attempt %d%s)",
            *entry.key,
            outcome.message,
            outcome.reason,
            entry.failed_attempts,
            f", retry at {_stamp(next_at)}" if next_at else ", waiting for a change",
        )
        status = self._failure_status(entry, exc, now, next_at)
        self.metrics.renewal_failed(outcome.reason, getattr(exc, "error", None))
        self.metrics.credential_failing(entry.key, ready=status["conditions"][0]["status"] == "True")
        try:
            await self._write_status(entry, status)
        except ApiError as api_exc:
            logger.warning("%s/%s: cannot write status: %s", *entry.key, api_exc)
        if entry.credential is not None and (entry.failed_attempts == 1 or outcome.permanent):
            await self._event(entry.credential, "Warning", outcome.reason, outcome.message)

    def _backoff_delay(self, entry: Entry, retry_after: float | None = None, *, now: datetime | None = None) -> float:
        """Seconds until the next attempt after ``entry.failed_attempts`` failures in a row.

        With ``now``, retries close in on the expiry of the token the target Secret
        holds (``expiresAt``) rather than passing it (see :func:`backoff_delay`).
        """
        expires = _parse_stamp(entry.status.get("expiresAt")) if now is not None else None
        return backoff_delay(
            entry.failed_attempts,
            initial=self.settings.backoff_initial,
            maximum=self.settings.backoff_max,
            identity=entry.uid,
            retry_after=retry_after,
            valid_for=(expires - now).total_seconds() if expires is not None and now is not None else None,
        )

    async def _write_status(self, entry: Entry, status: dict[str, Any]) -> None:
        """Patch status only when it differs from what the API server already has."""
        if {k: v for k, v in status.items() if v is not None} == {
            k: v for k, v in entry.status.items() if v is not None
        }:
            return
        try:
            written = await self.kube.patch_credential_status(entry.key[0], entry.key[1], status)
        except ApiNotFoundError:
            # Deleted, and maybe never announced (a relist after a watch expiry does
            # not replay deletions): stop renewing a credential that is gone.
            if self._entries.get(entry.key) is entry:
                self._forget(entry.key)
            return
        entry.status = dict(written.get("status") or status)

    async def _event(self, credential: OAuthCredential, kind: str, reason: str, message: str) -> None:
        now = _stamp(self._clock())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{credential.metadata.name}.", "namespace": credential.metadata.namespace},
            "involvedObject": {
                "apiVersion": credential.api_version,
                "kind": credential.kind,
                "name": credential.metadata.name,
                "namespace": credential.metadata.namespace,
                "uid": credential.metadata.uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": kind,
            "source": {"component": "tokensync"},
            "reportingComponent": "tokensync.dev/operator",
            "reportingInstance": "tokensync",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.kube.create_event(credential.metadata.namespace, body)
        except ApiError as exc:
            logger.debug("cannot post an event: %s", exc)
