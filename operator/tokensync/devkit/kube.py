"""A Kubernetes API emulator that is faithful where kopf and tokensync rely on it.

:class:`kmock.KubernetesEmulator` stores objects as plain JSON and deliberately ignores the
API conventions. :class:`ClusterEmulator` adds the few that kopf and the operator depend on:
server-set metadata (``uid``, ``creationTimestamp``, ``resourceVersion``, ``generation``), the
status subresource, optimistic concurrency (409), JSON/merge/strategic patches, graceful
deletion with finalizers, ownerReference garbage collection, label/field selectors, and
watch streams that resume from a ``resourceVersion`` and send bookmarks.

:func:`serve_cluster` runs it on 127.0.0.1 in the current event loop, :func:`cluster_in_thread`
in a background thread (so that the synchronous ``kubernetes`` client can be called directly);
both yield a :class:`RunningCluster` that configures the ``kubernetes`` client and kopf for it.

Used by the tests and by ``tokensync demo``; never imported by the operator's own layers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import datetime
import json
import re
import secrets
import string
import threading
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import kopf
import kubernetes.client
import yaml

Body = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]
Selector = list[tuple[str, str, frozenset[str]]]  # (key, operator, values)
_T = TypeVar("_T")

_WRITES = (kmock.method.POST, kmock.method.PUT, kmock.method.PATCH, kmock.method.DELETE)
_VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
_SERVER_FIELDS = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "resourceVersion",
    "generation",
)
_SYSTEM_FIELDS = (*_SERVER_FIELDS, "name", "namespace")  # clients cannot change these in updates
# Strategic-merge-patch lists that merge instead of being replaced: field path -> merge key.
_MERGED_LISTS: dict[tuple[str, ...], str | None] = {
    ("metadata", "finalizers"): None,
    ("metadata", "ownerReferences"): "uid",
}
# kmock parses /api/v1/namespaces[/{name}] as a namespace scope (and crashes on the bare list).
_NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces(?P<rest>/[^/]+(?:/status|/finalize)?)?/?$")
_TERM = re.compile(
    r"^\s*(?:!\s*(?P<absent>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|=|!=)\s*(?P<value>[\w./-]*)"
    r"|\s+(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?)\s*$"
)


@dataclass(frozen=True, kw_only=True)
class ResourceSpec:
    """How a resource behaves: its discovery info plus the API-server semantics to emulate."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status: bool = False  # has the status subresource: /status writes only .status, others never
    generation: bool = False  # metadata.generation is tracked (custom resources, not Secrets)
    custom: bool = False  # defined by a CRD: no strategic-merge-patch, as in Kubernetes
    singular: str = ""
    shortnames: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @classmethod
    def from_crd(cls, crd: Mapping[str, Any]) -> ResourceSpec:
        """The storage version of a CustomResourceDefinition (other versions are not served)."""
        spec, names = crd["spec"], crd["spec"]["names"]
        version = next((v for v in spec["versions"] if v.get("storage")), spec["versions"][0])
        return cls(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            kind=names["kind"],
            namespaced=spec.get("scope", "Namespaced") == "Namespaced",
            status="status" in (version.get("subresources") or {}),
            generation=True,
            custom=True,
            singular=names.get("singular") or names["kind"].lower(),
            shortnames=frozenset(names.get("shortNames", ())),
            categories=frozenset(names.get("categories", ())),
        )


NAMESPACES = ResourceSpec(group="", version="v1", plural="namespaces", kind="Namespace", namespaced=False, status=True)
SECRETS = ResourceSpec(group="", version="v1", plural="secrets", kind="Secret")
EVENTS = ResourceSpec(group="", version="v1", plural="events", kind="Event")
EVENTS_V1 = ResourceSpec(group="events.k8s.io", version="v1", plural="events", kind="Event")
CRDS = ResourceSpec(
    group="apiextensions.k8s.io",
    version="v1",
    plural="customresourcedefinitions",
    kind="CustomResourceDefinition",
    namespaced=False,
    status=True,
    generation=True,
)
BUILTINS = (NAMESPACES, SECRETS, EVENTS, EVENTS_V1, CRDS)


class _Event(NamedTuple):
    type: str
    object: Body
    old: Body | None  # the previous state, to turn label-selector transitions into ADDED/DELETED


@attrs.define(kw_only=True)
class ClusterEmulator(kmock.KubernetesEmulator):
    """kmock's emulator plus the Kubernetes API conventions that kopf and tokensync rely on.

    All writes go through one locked code path (:meth:`_write`) that stamps metadata and
    broadcasts watch events carrying the new ``resourceVersion`` — kopf resumes watches from
    it and waits for it after its own patches. kmock's own mutation logic is bypassed: it is
    one monolithic method that stores and broadcasts before metadata can be stamped, and has
    no PUT. Everything else (discovery, fetching, ``kmock.objects``, reactions) is kmock's.

    Watch ``resourceVersion=N`` replays every stored version newer than N from the objects'
    histories (exact, as kmock keeps them all); without it, the current objects are sent as
    ADDED. LIST ignores ``limit`` (no pagination). Objects assigned directly via
    ``emulator.objects[...] = ...`` bypass all of this: use :meth:`create_object` instead.
    """

    bookmark_interval: float = 60.0  # as kube-apiserver; kopf reconnects after 70 s of silence
    #: Finished requests kept for kmock's assertions (``list(emulator)``, ``request in view``).
    #: kmock keeps them all and matches every new request against every recorded one, so
    #: without a bound each request costs O(requests served): 35 ms per GET after 1,000
    #: requests, 100 ms after 2,000. ``None`` keeps everything (kmock's own behaviour).
    request_history: int | None = 32
    _inflight: set[int] = attrs.field(factory=set, init=False)
    _specs: dict[kmock.resource, ResourceSpec] = attrs.field(factory=dict, init=False)
    _revision: int = attrs.field(default=0, init=False)
    _outcomes: weakref.WeakKeyDictionary[kmock.Request, Body] = attrs.field(
        factory=weakref.WeakKeyDictionary, init=False
    )
    _closing: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_update
        for spec in BUILTINS:
            self.declare(spec)

    def declare(self, spec: ResourceSpec) -> kmock.resource:
        """Serve a resource: in discovery (kopf needs verbs & the status subresource) and in writes."""
        self._specs[spec.resource] = spec
        self.resources[spec.resource] = kmock.ResourceInfo(
            kind=spec.kind,
            singular=spec.singular or spec.kind.lower(),
            namespaced=spec.namespaced,
            verbs=_VERBS,
            shortnames=spec.shortnames,
            categories=spec.categories,
            subresources={"status"} if spec.status else set(),
        )
        return spec.resource

    async def create_object(self, resource: kmock.resource | str, body: Mapping[str, Any]) -> Body:
        """Create an object as ``POST`` would (metadata, events, CRD establishing), without HTTP."""
        async with self._lock:
            return await self._create(kmock.resource(resource), None, copy.deepcopy(dict(body)))

    async def add_crd(self, crd: Mapping[str, Any]) -> ResourceSpec:
        """Store a CustomResourceDefinition and serve its resource, as the API server does."""
        await self.create_object(CRDS.resource, crd)
        return self._specs[ResourceSpec.from_crd(crd).resource]

    def close_watches(self) -> None:
        """End all watch streams now, so that the HTTP server can shut down without waiting."""
        self._closing.set()

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if (match := _NAMESPACES_PATH.match(raw_request.path)) is not None:  # see _NAMESPACES_PATH
            # An equivalent path: the scope `_` (never a namespace name) is ignored, as for any
            # cluster-scoped resource. Recorded requests show this path & scope, though. The query
            # (watch, selectors, resourceVersion...) is kept: with_path() alone drops it.
            url = raw_request.rel_url
            path = f"/api/v1/namespaces/_/namespaces{match['rest'] or ''}"
            raw_request = raw_request.clone(rel_url=url.with_path(path).with_query(url.query))
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        self._inflight.add(id(request))
        try:
            return await self._serve(request)
        finally:
            self._inflight.discard(id(request))
            self._forget_requests()

    def _forget_requests(self) -> None:
        """Keep the newest ``request_history`` finished requests, and every one still being served.

        In-flight requests must stay: kmock finds a request's reaction by looking for it in
        the recorded history (a request it cannot find would get no answer).
        """
        limit = self.request_history
        recorded: list[Any] = self._requests
        if limit is None or len(recorded) < 2 * limit:
            return
        keep = {id(r) for r in recorded[-limit:]} | self._inflight
        recorded[:] = [r for r in recorded if id(r) in keep]
        for payload in self._payloads:
            seen = getattr(payload, "_requests", None)
            if isinstance(seen, list):
                seen[:] = [r for r in seen if id(r) in keep]

    async def _serve(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.method in _WRITES:
            try:  # shielded: a client disconnecting must not leave a write half-done
                outcome = await asyncio.shield(self._locked_write(request))
            except kmock.KubernetesError as exc:  # an API answer, not a server failure to collect
                return await self._render_error(exc)
            if outcome is not None:
                self._outcomes[request] = outcome
        try:  # dispatch to reactions & fallbacks, skipping kmock's own writes
            return await super(kmock.KubernetesEmulator, self)._handle(request)
        except kmock.KubernetesError as exc:  # e.g. 404s of existence checks: not worth keeping
            return await self._render_error(exc)

    async def _locked_write(self, request: kmock.Request) -> Body | None:
        async with self._lock:
            return await self._write(request)

    async def _write(self, request: kmock.Request) -> Body | None:
        assert request.resource is not None
        if request.method == kmock.method.POST and request.name is None:
            return await self._create(request.resource, self._scope(request), _body(request.data))
        if request.name is None or request.subresource not in (None, "status"):
            return None  # not emulated (collections, other subresources): kmock answers
        key, sub, data = (request.resource, self._scope(request), request.name), request.subresource, request.data
        if request.method == kmock.method.DELETE and sub is None:
            return await self._delete(key, {**(data if isinstance(data, dict) else {}), **request.params})
        if request.method == kmock.method.PUT:
            body = _body(data)
            return await self._update(key, sub, lambda _: body, _version(body))
        if request.method == kmock.method.PATCH:
            ctype = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
            return await self._update(key, sub, *self._patcher(key, ctype.split(";")[0].strip(), data))
        return None

    def _patcher(self, key: Key, ctype: str, patch: Any) -> tuple[Callable[[Body], Body], str | None]:
        """Kopf JSON-patches finalizers with a resourceVersion test; the client sends strategic merges."""
        if ctype == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _error(400, "BadRequest", "a JSON patch must be a list of operations", key)

            def apply(body: Body) -> Body:
                try:
                    return jsonpatch.apply_patch(body, patch)  # type: ignore[no-any-return]
                except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                    raise _error(422, "Invalid", str(exc), key) from exc  # kopf retries on 422

            return apply, None
        strategic = ctype == "application/strategic-merge-patch+json"
        if "apply-patch" in ctype or (strategic and self._spec(key[0]).custom):
            raise _error(415, "UnsupportedMediaType", f"the media type {ctype!r} is not supported", key)
        body = _body(patch)
        return (lambda old: _merge(old, body, strategic=strategic)), _version(body)

    async def _create(self, resource: kmock.resource, namespace: str | None, body: Body) -> Body:
        spec, meta = self._spec(resource), _meta(body)
        namespace = (namespace or meta.get("namespace")) if spec.namespaced else None
        if not meta.get("name") and meta.get("generateName"):  # kopf names its events this way
            meta["name"] = meta["generateName"] + "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5)
            )
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name or generateName is required", (resource, namespace, ""))
        key = (resource, namespace, meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise _error(409, "AlreadyExists", f'{_what(key)} "{key[2]}" already exists', key)
        if meta.get("resourceVersion"):  # e.g. a body read from the API and posted back
            raise _error(422, "Invalid", "resourceVersion should not be set on objects to be created", key)
        for field in _SERVER_FIELDS:
            meta.pop(field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        meta.update({"namespace": namespace} if namespace else {})
        meta.update({"generation": 1} if spec.generation else {})
        body = {"apiVersion": spec.api_version, "kind": spec.kind, **body}
        if spec.status:  # status is written only via /status, so it starts empty
            body.pop("status", None)
        if resource == NAMESPACES.resource:
            body["status"] = {"phase": "Active"}
        if resource == CRDS.resource:  # play the apiextensions controller: establish & serve it at once
            try:
                served = self.declare(ResourceSpec.from_crd(body))
            except (KeyError, TypeError, IndexError, StopIteration) as exc:
                raise _error(422, "Invalid", f"malformed CustomResourceDefinition: {exc!r}", key) from exc
            body["status"] = {
                "acceptedNames": body["spec"]["names"],
                "storedVersions": [served.version],
                "conditions": [
                    {"type": t, "status": "True", "lastTransitionTime": _now()}
                    for t in ("NamesAccepted", "Established")
                ],
            }
        self._bump(body)
        if key in self._objects:
            self._objects[key].history.append(body)
        else:
            self._objects[key] = body
        await self._emit(resource, "ADDED", body, None)
        return body

    async def _update(self, key: Key, sub: str | None, change: Callable[[Body], Body], expected: str | None) -> Body:
        obj, spec = self._live(key), self._spec(key[0])
        if sub == "status" and not spec.status:
            raise _error(404, "NotFound", f"{_what(key)} has no status subresource", key)
        old = copy.deepcopy(obj.raw)
        if expected is not None and expected != _meta(old).get("resourceVersion"):
            raise _conflict(key, "the object has been modified; please apply your changes to the latest version")
        new = change(copy.deepcopy(old))
        meta = _meta(new)
        for field in _SYSTEM_FIELDS:  # server-owned: clients cannot change them
            meta.pop(field, None)
            meta.update({field: _meta(old)[field]} if field in _meta(old) else {})
        new.update(apiVersion=old.get("apiVersion"), kind=old.get("kind"))
        if spec.status:  # the split: /status writes only .status; the main endpoint never does
            new = {**old, "status": new.get("status")} if sub == "status" else {**new, "status": old.get("status")}
            new = {k: v for k, v in new.items() if k != "status" or v is not None}
        if new == old:  # a no-op write: no new resourceVersion, no watch event (as the API server)
            return old
        if spec.generation and _content(new, spec) != _content(old, spec):
            new["metadata"]["generation"] = old["metadata"].get("generation", 0) + 1
        self._bump(new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            await self._remove(key, new, cascade=True)  # the last finalizer is gone: delete now
        else:
            obj.history.append(new)
            await self._emit(key[0], "MODIFIED", new, old)
        return new

    async def _delete(self, key: Key, options: Mapping[str, Any]) -> Body:
        obj, spec = self._live(key), self._spec(key[0])
        old = copy.deepcopy(obj.raw)
        meta, preconditions = old["metadata"], options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) not in (None, meta.get(field)):
                raise _conflict(key, f"Precondition failed: {field} in precondition: {preconditions[field]}")
        if meta.get("finalizers") and meta.get("deletionTimestamp"):
            return old  # already marked; the finalizers' owners decide when it goes
        new = copy.deepcopy(old)
        self._bump(new)
        if not meta.get("finalizers"):
            await self._remove(key, new, cascade=options.get("propagationPolicy") != "Orphan")
            return new
        new["metadata"].update(deletionTimestamp=_now(), deletionGracePeriodSeconds=0)
        if spec.generation:  # the API server bumps it when marking for deletion, too
            new["metadata"]["generation"] = meta.get("generation", 0) + 1
        obj.history.append(new)
        await self._emit(key[0], "MODIFIED", new, old)
        return new

    async def _remove(self, key: Key, final: Body, *, cascade: bool) -> None:
        """Really delete: DELETED carries the final state; dependents go as the garbage collector's."""
        self._objects[key].history.append(final)
        self._objects[key].delete()
        await self._emit(key[0], "DELETED", final, None)
        if cascade:
            await self._collect_dependents(final)

    async def _collect_dependents(self, owner: Body) -> None:
        """Background cascading deletion, synchronously: tokensync's Secrets are owned by its CRs."""
        uid, namespace = owner["metadata"].get("uid"), owner["metadata"].get("namespace")
        for key, obj in list(self._objects.items()):
            refs = [] if obj.deleted else _meta(obj.raw).get("ownerReferences") or []
            if (namespace is not None and key[1] != namespace) or not any(r.get("uid") == uid for r in refs):
                continue
            alive = [ref for ref in refs if ref.get("uid") != uid and self._exists(ref.get("uid"))]
            if alive:  # other owners remain: only the dangling reference goes
                await self._update(key, None, _owned_by(alive), None)
            else:
                await self._delete(key, {})

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        assert request.name is not None
        async with self._lock:  # as kmock's, but with the API server's NotFound Status
            return self._live((request.resource, self._scope(request), request.name)).raw

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        # kmock.Response is documented (docs/responses.rst) but missing from kmock.__all__.
        return kmock.Response(status=201, payload=self._outcome(request))  # type: ignore[attr-defined]

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        return self._outcome(request)

    async def _serve_delete(self, request: kmock.Request) -> kmock.Payload:
        return self._outcome(request)

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        labels, fields, namespace = *_selectors(request), self._scope(request)
        async with self._lock:
            objs = [(key, obj.raw) for key, obj in self._objects.items() if not obj.deleted]
            items = [body for key, body in objs if key[0] == request.resource and _in_scope(request, namespace, key)]
            items, revision = [body for body in items if _matches(body, labels, fields)], self._revision
        spec = self._spec(request.resource)
        return {
            "apiVersion": spec.api_version,
            "kind": f"{spec.kind}List",
            "metadata": {"resourceVersion": str(revision)},
            "items": sorted(items, key=lambda b: (b["metadata"].get("namespace") or "", b["metadata"]["name"])),
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        assert request.resource is not None
        labels, fields = _selectors(request)  # before the headers: a bad selector is a plain 400
        params, spec, bus = request.params, self._spec(request.resource), self._buses[request.resource]
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        since = int(params.get("resourceVersion") or 0) if params.get("resourceVersion", "").isdigit() else 0
        namespace = self._scope(request)
        yield b""  # send the headers now: the client is waiting for them, maybe for long
        async with self._lock:  # mark the bus and take the backlog atomically: no gaps, no duplicates
            mark = await bus.mark()
            backlog, revision = self._backlog(request, namespace, since), self._revision
        try:
            for event in backlog:
                if (rendered := _render(event, labels, fields)) is not None:
                    yield rendered
            if params.get("sendInitialEvents") == "true":  # kopf's settings.watching.initial_streaming
                yield _bookmark(spec, revision, {"k8s.io/initial-events-end": "true"})
            async for item in self._follow(bus.stream(since=mark), timeout):
                if isinstance(item, _Event) and _in_scope(request, namespace, _key(request.resource, item.object)):
                    if (rendered := _render(item, labels, fields)) is not None:
                        yield rendered
                elif item is None and params.get("allowWatchBookmarks") == "true":
                    yield _bookmark(spec, self._revision)
        finally:
            await bus.unmark(mark)

    async def _follow(self, stream: AsyncIterator[Any], timeout: float | None) -> AsyncIterator[Any]:
        """Live events, ``None`` every bookmark interval; ends at ``timeoutSeconds`` or on closing."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        closing = asyncio.ensure_future(self._closing.wait())
        pending: asyncio.Future[Any] | None = None
        try:
            while not closing.done():
                pending = pending or asyncio.ensure_future(anext(stream))
                left = self.bookmark_interval if deadline is None else deadline - loop.time()
                if left <= 0:
                    return
                done, _ = await asyncio.wait(
                    {pending, closing}, timeout=min(left, self.bookmark_interval), return_when=asyncio.FIRST_COMPLETED
                )
                if pending in done:
                    item, pending = pending.result(), None
                    yield item
                elif not done:
                    yield None
        finally:
            for future in (closing, pending):
                if future is not None:
                    future.cancel()
            await asyncio.gather(*(f for f in (closing, pending) if f is not None), return_exceptions=True)
            if isinstance(stream, AsyncGenerator):  # it is, though typed as an iterator by kmock
                await stream.aclose()

    def _backlog(self, request: kmock.Request, namespace: str | None, since: int) -> list[_Event]:
        events: list[_Event] = []
        for key, obj in self._objects.items():
            if key[0] != request.resource or not _in_scope(request, namespace, key):
                continue
            if not since:  # a fresh watch: the current state, as synthetic ADDED events
                events.extend([] if obj.deleted else [_Event("ADDED", obj.raw, None)])
                continue
            history = [None if version is None else version.raw for version in obj.history]
            for index, body in enumerate(history):
                if body is None or _order(body) <= since:
                    continue
                prev = history[index - 1] if index else None
                gone = index + 1 < len(history) and history[index + 1] is None
                events.append(_Event("ADDED" if prev is None else "DELETED" if gone else "MODIFIED", body, prev))
        return sorted(events, key=lambda event: _order(event.object))

    def _spec(self, resource: kmock.resource) -> ResourceSpec:
        plural = resource.plural or ""
        return self._specs.get(resource) or ResourceSpec(
            group=resource.group or "", version=resource.version or "v1", plural=plural, kind=plural.title()
        )

    def _scope(self, request: kmock.Request) -> str | None:
        """The namespace of a request; cluster-scoped resources ignore it, as in Kubernetes."""
        assert request.resource is not None
        return request.namespace if self._spec(request.resource).namespaced else None

    def _live(self, key: Key) -> kmock.Object:
        if key not in self._objects or self._objects[key].deleted:
            raise _error(404, "NotFound", f'{_what(key)} "{key[2]}" not found', key)  # as the API server
        return self._objects[key]

    def _exists(self, uid: str | None) -> bool:
        return any(not obj.deleted and _meta(obj.raw).get("uid") == uid for obj in self._objects.values())

    def _outcome(self, request: kmock.Request) -> Body:
        if request not in self._outcomes:
            raise kmock.KubernetesNotFoundError()
        return self._outcomes[request]

    def _bump(self, body: Body) -> None:
        self._revision += 1
        body["metadata"]["resourceVersion"] = str(self._revision)

    async def _emit(self, resource: kmock.resource, type_: str, body: Body, old: Body | None) -> None:
        await self._buses[resource].put(_Event(type_, body, old))


def _error(code: int, reason: str, message: str, key: Key) -> kmock.KubernetesError:
    details = {"name": key[2], "group": key[0].group, "kind": key[0].plural}
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details)


def _conflict(key: Key, why: str) -> kmock.KubernetesError:
    return _error(409, "Conflict", f'Operation cannot be fulfilled on {_what(key)} "{key[2]}": {why}', key)


def _owned_by(refs: list[Any]) -> Callable[[Body], Body]:
    return lambda body: {**body, "metadata": {**body["metadata"], "ownerReferences": refs}}


def _what(key: Key) -> str:
    return f"{key[0].plural}.{key[0].group}" if key[0].group else f"{key[0].plural}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _body(data: Any) -> Body:
    if not isinstance(data, dict):
        raise kmock.KubernetesError(
            status=400, reason="BadRequest", message="a JSON object is expected", details={"causes": []}
        )
    return copy.deepcopy(data)


def _meta(body: Body) -> dict[str, Any]:
    meta = body.setdefault("metadata", {})
    if not isinstance(meta, dict):
        raise kmock.KubernetesError(
            status=422, reason="Invalid", message="metadata must be an object", details={"causes": []}
        )
    return meta


def _version(body: Mapping[str, Any]) -> str | None:
    meta = body.get("metadata")
    return meta.get("resourceVersion") if isinstance(meta, dict) else None


def _order(body: Mapping[str, Any]) -> int:
    version = _version(body) or ""
    return int(version) if version.isdigit() else 0


def _content(body: Body, spec: ResourceSpec) -> Body:
    """What metadata.generation tracks: all but metadata, and but status if it is a subresource."""
    return {k: v for k, v in body.items() if k != "metadata" and not (spec.status and k == "status")}


def _merge(old: Any, patch: Any, *, strategic: bool, path: tuple[str, ...] = ()) -> Any:
    """RFC 7386 merge-patch; ``strategic`` adds the part of strategic-merge-patch that metadata needs.

    Finalizers and ownerReferences merge as in Kubernetes (so the operator's strategic patch
    that adds its finalizer keeps others' finalizers); ``$deleteFromPrimitiveList`` is honoured;
    other directives (``$patch``, ``$setElementOrder``, ``$retainKeys``) are dropped.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(old) if isinstance(old, dict) else {}
    for key, value in sorted(patch.items(), key=lambda item: item[0].startswith("$")):
        if strategic and key.startswith("$deleteFromPrimitiveList/"):
            field = key.partition("/")[2]
            result[field] = [item for item in result.get(field) or [] if item not in value]
        elif strategic and key.startswith("$"):
            continue
        elif value is None:
            result.pop(key, None)
        elif strategic and (*path, key) in _MERGED_LISTS and isinstance(value, list):
            merge_key, current = _MERGED_LISTS[(*path, key)], list(result.get(key) or [])
            if merge_key is None:
                result[key] = current + [item for item in value if item not in current]
            else:
                merged = {item.get(merge_key): item for item in current + copy.deepcopy(value)}
                result[key] = list(merged.values())
        else:
            result[key] = _merge(result.get(key), value, strategic=strategic, path=(*path, key))
    return result


def parse_selector(text: str) -> Selector:
    """Parse a label/field selector: ``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``, ``k notin (a)``."""
    selector: Selector = []
    for term in re.split(r",(?![^()]*\))", text):
        if not term.strip():
            continue
        if (m := _TERM.match(term)) is None:
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"invalid selector: {term!r}", details={"causes": []}
            )
        if m["absent"]:
            selector.append((m["absent"], "!", frozenset()))
        elif m["op"]:
            selector.append((m["key"], "!=" if m["op"] == "!=" else "=", frozenset({m["value"]})))
        elif m["set"]:
            values = frozenset(v.strip() for v in m["values"].split(",") if v.strip())
            selector.append((m["key"], m["set"], values))
        else:
            selector.append((m["key"], "exists", frozenset()))
    return selector


def _satisfies(values: Mapping[str, str], selector: Selector) -> bool:
    for key, op, expected in selector:
        value = values.get(key)
        if op in ("=", "in"):
            ok = value in expected
        elif op in ("!=", "notin"):
            ok = value not in expected  # an absent key satisfies these, as in Kubernetes
        else:
            ok = (key in values) == (op == "exists")
        if not ok:
            return False
    return True


def _field(body: Any, path: str) -> str | None:
    for part in path.split("."):
        body = body.get(part) if isinstance(body, dict) else None
    return None if body is None else body if isinstance(body, str) else json.dumps(body)


def _matches(body: Body, labels: Selector, fields: Selector) -> bool:
    field_values = {key: v for key, _, _ in fields if (v := _field(body, key)) is not None}
    return _satisfies(_meta(body).get("labels") or {}, labels) and _satisfies(field_values, fields)


def _selectors(request: kmock.Request) -> tuple[Selector, Selector]:
    params = request.params
    return parse_selector(params.get("labelSelector", "")), parse_selector(params.get("fieldSelector", ""))


def _key(resource: kmock.resource, body: Body) -> Key:
    return resource, body["metadata"].get("namespace"), body["metadata"]["name"]


def _in_scope(request: kmock.Request, namespace: str | None, key: Key) -> bool:
    return namespace in (None, key[1]) and request.name in (None, key[2])


def _render(event: _Event, labels: Selector, fields: Selector) -> Body | None:
    """A watch event as the client sees it: objects entering/leaving the selector are ADDED/DELETED."""
    now = _matches(event.object, labels, fields)
    was = event.old is not None and _matches(event.old, labels, fields)
    if event.type == "MODIFIED" and event.old is not None and now != was:
        if now:
            return {"type": "ADDED", "object": event.object}
        meta = {**event.old["metadata"], "resourceVersion": event.object["metadata"]["resourceVersion"]}
        return {"type": "DELETED", "object": {**event.old, "metadata": meta}}
    return {"type": event.type, "object": event.object} if now else None


def _bookmark(spec: ResourceSpec, revision: int, annotations: Mapping[str, str] | None = None) -> Body:
    meta = {"resourceVersion": str(revision), **({"annotations": dict(annotations)} if annotations else {})}
    return {"type": "BOOKMARK", "object": {"apiVersion": spec.api_version, "kind": spec.kind, "metadata": meta}}


def read_crds(*paths: str | Path) -> list[Body]:
    """CustomResourceDefinitions from YAML files or directories of them (e.g. ``crds/``)."""
    files = [f for p in map(Path, paths) for f in (sorted(p.glob("*.y*ml")) if p.is_dir() else [p])]
    docs = [doc for f in files for doc in yaml.safe_load_all(f.read_text(encoding="utf-8"))]
    return [doc for doc in docs if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"]


@dataclass(frozen=True)
class RunningCluster:
    """An emulator served over HTTP, and how to point clients at it."""

    emulator: ClusterEmulator
    url: str  # e.g. http://127.0.0.1:43210
    loop: asyncio.AbstractEventLoop  # the emulator's loop: touch the emulator only from there

    def kube_configuration(self) -> kubernetes.client.Configuration:
        """For ``kubernetes.client.ApiClient(...)``; does not change the client's global default."""
        return kubernetes.client.Configuration(host=self.url)

    def kubeconfig(self, namespace: str = "default") -> Body:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "emulator",
            "preferences": {},
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace}}
            ],
        }

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """A kubeconfig file (JSON is YAML) for ``KUBECONFIG``, kubectl, or ``load_kube_config``."""
        path = Path(path)
        path.write_text(json.dumps(self.kubeconfig(namespace), indent=2), encoding="utf-8")
        return path

    def connection_info(self, namespace: str = "default") -> kopf.ConnectionInfo:
        """What an ``@kopf.on.login`` handler returns to log kopf in to the emulator."""
        return kopf.ConnectionInfo(server=self.url, default_namespace=namespace)

    def login_kopf(self, registry: kopf.OperatorRegistry | None = None, namespace: str = "default") -> None:
        """Register an ``@kopf.on.login`` handler for this cluster (it replaces kopf's default logins)."""

        @kopf.on.login(registry=registry)
        def login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
            return self.connection_info(namespace)

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        """Run a coroutine (e.g. ``emulator.add_crd(...)``) in the emulator's loop from another thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


@asynccontextmanager
async def serve_cluster(
    *,
    crds: Iterable[Mapping[str, Any]] = (),
    namespaces: Iterable[str] = ("default",),
    host: str = "127.0.0.1",
    port: int | None = None,
    emulator: ClusterEmulator | None = None,
) -> AsyncIterator[RunningCluster]:
    """Serve an emulator on ``host`` in the current loop, with these namespaces and CRDs in it."""
    emulator = emulator if emulator is not None else ClusterEmulator()
    async with emulator, kmock.Server(emulator, host=host, port=port) as server:
        try:
            for namespace in namespaces:
                await emulator.create_object(NAMESPACES.resource, {"metadata": {"name": namespace}})
            for crd in crds:
                await emulator.add_crd(crd)
            yield RunningCluster(emulator, f"http://{server.host}:{server.port}", asyncio.get_running_loop())
        finally:
            emulator.close_watches()


@contextmanager
def cluster_in_thread(**kwargs: Any) -> Iterator[RunningCluster]:
    """:func:`serve_cluster` in a daemon thread with its own loop: safe for synchronous clients.

    Blocking calls of the ``kubernetes`` client (from tests or from sync kopf handlers) cannot
    deadlock the emulator this way, whatever loop they are made from.
    """
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future[RunningCluster] = concurrent.futures.Future()
    stop = threading.Event()

    async def main() -> None:
        try:
            async with serve_cluster(**kwargs) as cluster:
                ready.set_result(cluster)
                while not stop.is_set():
                    await asyncio.sleep(0.05)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    def target() -> None:
        try:
            loop.run_until_complete(main())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    thread = threading.Thread(target=target, name="kube-emulator", daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=30)
    finally:
        stop.set()
        thread.join(timeout=30)
