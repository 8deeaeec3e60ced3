"""The Kubernetes API emulator (tokensync.devkit.kube), through real HTTP and the official client.

Each test states the API-server behaviour that kopf or tokensync relies on.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import re
import threading
import urllib.error
import urllib.request
import uuid

import kubernetes
import pytest
from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi

from support.kube import KOPFEXAMPLES_CRD, get_json, make_crd, stream_json
from tokensync.devkit.kube import ClusterEmulator, RunningCluster, parse_selector, serve_cluster

NS = "default"
GROUP, VERSION, PLURAL = "kopf.dev", "v1", "kopfexamples"


@pytest.fixture
def core(kube_api):
    return CoreV1Api(kube_api)


@pytest.fixture
def custom(kube, kube_api):
    kube.call(kube.emulator.add_crd(KOPFEXAMPLES_CRD))
    return CustomObjectsApi(kube_api)


def secret(name, **metadata):
    return {"metadata": {"name": name, **metadata}, "stringData": {"token": "t0"}}


def example(name, spec=None, **extra):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "KopfExample", "metadata": {"name": name},
            "spec": spec or {"field": 1}, **extra}  # fmt: skip


def rv(obj):
    meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata
    return int(meta["resourceVersion"] if isinstance(meta, dict) else meta.resource_version)


def api_error(exc_info):
    body = json.loads(exc_info.value.body)
    assert body["kind"] == "Status"
    assert body["code"] == exc_info.value.status
    return body


def patch_example(custom, name, body, *, status=False):
    patch = custom.patch_namespaced_custom_object_status if status else custom.patch_namespaced_custom_object
    return patch(GROUP, VERSION, NS, PLURAL, name, body)


def get_example(custom, name):
    return custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


# -- Server-set metadata ---------------------------------------------------------------------


def test_create_sets_uid_timestamp_and_version_but_no_generation_for_secrets(kube, core):
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    created = core.create_namespaced_secret(NS, secret("s1"))
    raw = get_json(kube, "/api/v1/namespaces/default/secrets/s1")

    assert uuid.UUID(created.metadata.uid).version == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", raw["metadata"]["creationTimestamp"])
    assert before <= created.metadata.creation_timestamp <= datetime.datetime.now(datetime.UTC)
    assert created.metadata.resource_version.isdigit()
    assert created.metadata.namespace == NS
    assert created.metadata.generation is None  # Kubernetes does not track it for Secrets
    assert raw["apiVersion"] == "v1"
    assert raw["kind"] == "Secret"


def test_client_cannot_set_server_fields(core):
    created = core.create_namespaced_secret(NS, secret("s1", uid="mine", creationTimestamp="2000-01-01T00:00:00Z"))
    assert created.metadata.uid != "mine"
    patched = core.patch_namespaced_secret("s1", NS, {"metadata": {"uid": "mine", "generation": 7}})
    assert patched.metadata.uid == created.metadata.uid
    assert patched.metadata.generation is None

    with pytest.raises(ApiException) as exc_info:  # as kube-apiserver: rv must be empty on create
        core.create_namespaced_secret(NS, secret("s2", resourceVersion="5"))
    assert exc_info.value.status == 422


def test_generate_name(core):
    created = core.create_namespaced_secret(NS, {"metadata": {"generateName": "kopf-event-"}})
    assert re.fullmatch(r"kopf-event-[a-z0-9]{5}", created.metadata.name)


def test_resource_version_is_cluster_wide_and_bumped_by_every_write(core, custom):
    versions = [
        rv(core.create_namespaced_secret(NS, secret("s1", finalizers=["x/y"]))),
        rv(custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("e1"))),  # other resource
        rv(core.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"a": "b"}}})),
        rv(core.replace_namespaced_secret("s1", NS, {**secret("s1", finalizers=["x/y"]), "type": "Opaque"})),
        rv(patch_example(custom, "e1", {"status": {"phase": "ok"}}, status=True)),
        rv(core.delete_namespaced_secret("s1", NS)),  # marks it: finalizers block the deletion
    ]
    assert versions == sorted(set(versions))
    assert rv(core.read_namespaced_secret("s1", NS)) == versions[-1]
    assert int(core.list_namespaced_secret(NS).metadata.resource_version) == versions[-1]


def test_noop_write_keeps_resource_version(core):
    created = core.create_namespaced_secret(NS, secret("s1", labels={"a": "b"}))
    patched = core.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"a": "b"}}})
    assert rv(patched) == rv(created)  # and no watch event: kopf waits for the rv it patched


def test_generation_changes_with_spec_only(custom):
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("e1"))
    assert created["metadata"]["generation"] == 1

    labelled = patch_example(custom, "e1", {"metadata": {"labels": {"a": "b"}, "annotations": {"c": "d"}}})
    with_status = patch_example(custom, "e1", {"status": {"phase": "done"}}, status=True)
    changed = patch_example(custom, "e1", {"spec": {"field": 2}})
    replaced = custom.replace_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "e1", {**changed, "spec": {"field": 3}}
    )

    assert [labelled["metadata"]["generation"], with_status["metadata"]["generation"]] == [1, 1]
    assert changed["metadata"]["generation"] == 2
    assert replaced["metadata"]["generation"] == 3


def test_generation_counts_status_without_the_subresource(kube, kube_api):
    kube.call(kube.emulator.add_crd(make_crd("kopf.dev", "plainexamples", "PlainExample", status=False)))
    custom = CustomObjectsApi(kube_api)
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, "plainexamples", {"metadata": {"name": "p1"}})
    patched = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, "plainexamples", "p1", {"status": {"phase": "done"}}
    )
    assert patched["status"] == {"phase": "done"}  # no subresource: status is an ordinary field
    assert patched["metadata"]["generation"] == 2


# -- The status subresource --------------------------------------------------------------------


def test_status_is_dropped_on_create_and_ignored_by_the_main_endpoint(custom):
    created = custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, example("e1", status={"phase": "forged"})
    )
    assert "status" not in created

    patched = patch_example(custom, "e1", {"spec": {"field": 2}, "status": {"phase": "forged"}})
    assert patched["spec"] == {"field": 2}
    assert "status" not in patched

    replaced = custom.replace_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "e1", {**patched, "status": {"phase": "forged"}}
    )
    assert "status" not in replaced


def test_status_endpoint_changes_only_status(custom):
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("e1"))
    patched = patch_example(
        custom, "e1", {"spec": {"field": 9}, "metadata": {"labels": {"a": "b"}}, "status": {"phase": "ok"}},
        status=True,
    )  # fmt: skip
    assert patched["status"] == {"phase": "ok"}
    assert patched["spec"] == created["spec"]
    assert "labels" not in patched["metadata"]
    assert patched["metadata"]["generation"] == 1
    assert rv(patched) > rv(created)

    replaced = custom.replace_namespaced_custom_object_status(
        GROUP, VERSION, NS, PLURAL, "e1", {**patched, "spec": {"field": 10}, "status": {"phase": "again"}}
    )
    assert replaced["status"] == {"phase": "again"}
    assert replaced["spec"] == created["spec"]


def test_no_status_endpoint_for_secrets(kube, core):
    core.create_namespaced_secret(NS, secret("s1"))
    request = urllib.request.Request(
        kube.url + "/api/v1/namespaces/default/secrets/s1/status", method="PATCH", data=b'{"status": {}}',
        headers={"Content-Type": "application/merge-patch+json"},
    )  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as exc_info:
        urllib.request.urlopen(request, timeout=10)
    exc_info.value.close()
    assert exc_info.value.code == 404


# -- Optimistic concurrency --------------------------------------------------------------------


def test_replace_with_a_stale_resource_version_conflicts(core):
    created = core.create_namespaced_secret(NS, secret("s1"))
    core.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"a": "b"}}})

    stale = secret("s1", resourceVersion=created.metadata.resource_version)
    with pytest.raises(ApiException) as exc_info:
        core.replace_namespaced_secret("s1", NS, stale)
    assert exc_info.value.status == 409
    body = api_error(exc_info)
    assert body["reason"] == "Conflict"
    assert body["details"] == {"name": "s1", "group": "", "kind": "secrets"}
    assert "the object has been modified" in body["message"]

    unconditional = core.replace_namespaced_secret("s1", NS, secret("s1"))
    assert unconditional.metadata.labels is None  # PUT replaces the whole object


def test_patch_with_a_stale_resource_version_conflicts(core, custom):
    created = core.create_namespaced_secret(NS, secret("s1"))
    current = core.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"a": "b"}}})
    with pytest.raises(ApiException) as exc_info:
        core.patch_namespaced_secret("s1", NS, {"metadata": {"resourceVersion": created.metadata.resource_version}})
    assert exc_info.value.status == 409
    assert api_error(exc_info)["reason"] == "Conflict"

    fresh = {"metadata": {"resourceVersion": current.metadata.resource_version, "labels": {"c": "d"}}}
    assert core.patch_namespaced_secret("s1", NS, fresh).metadata.labels == {"a": "b", "c": "d"}

    example_v1 = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("e1"))
    patch_example(custom, "e1", {"spec": {"field": 2}})
    with pytest.raises(ApiException) as exc_info:
        patch_example(custom, "e1", {"metadata": example_v1["metadata"], "status": {}}, status=True)
    assert exc_info.value.status == 409


def test_json_patch_with_a_failed_test_is_unprocessable(custom):
    # Exactly what kopf sends to add/remove its finalizer; it retries on 422.
    created = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("e1"))
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": created["metadata"]["resourceVersion"]},
           {"op": "add", "path": "/metadata/finalizers", "value": ["tokensync.dev/finalizer"]}]  # fmt: skip
    json_patch = {"_content_type": "application/json-patch+json"}
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "e1", ops, **json_patch)
    assert patched["metadata"]["finalizers"] == ["tokensync.dev/finalizer"]

    with pytest.raises(ApiException) as exc_info:  # the same test: the version is stale now
        custom.patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "e1", ops, **json_patch)
    assert exc_info.value.status == 422
    assert api_error(exc_info)["reason"] == "Invalid"


def test_creating_an_existing_name_conflicts(core):
    core.create_namespaced_secret(NS, secret("s1"))
    with pytest.raises(ApiException) as exc_info:
        core.create_namespaced_secret(NS, secret("s1"))
    assert exc_info.value.status == 409
    body = api_error(exc_info)
    assert body["reason"] == "AlreadyExists"
    assert body["message"] == 'secrets "s1" already exists'
    core.create_namespaced_secret("other", secret("s1"))  # names are per namespace


def test_missing_objects_are_not_found(core):
    for call in (
        lambda: core.read_namespaced_secret("nope", NS),
        lambda: core.patch_namespaced_secret("nope", NS, {}),
        lambda: core.replace_namespaced_secret("nope", NS, secret("nope")),
        lambda: core.delete_namespaced_secret("nope", NS),
    ):
        with pytest.raises(ApiException) as exc_info:
            call()
        assert exc_info.value.status == 404
        assert api_error(exc_info)["message"] == 'secrets "nope" not found'


# -- Patch flavours ----------------------------------------------------------------------------


def test_strategic_merge_patch_merges_finalizers_and_owner_references(core):
    core.create_namespaced_secret(NS, secret("s1", finalizers=["a/keep"], ownerReferences=[owner_ref("o1", "u1")]))
    patched = core.patch_namespaced_secret(  # the client sends dict patches as strategic merges
        "s1", NS, {"metadata": {"finalizers": ["tokensync.dev/finalizer"], "ownerReferences": [owner_ref("o2", "u2")]}}
    )
    assert patched.metadata.finalizers == ["a/keep", "tokensync.dev/finalizer"]
    assert [ref.uid for ref in patched.metadata.owner_references] == ["u1", "u2"]

    removed = core.patch_namespaced_secret(
        "s1", NS, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["tokensync.dev/finalizer"]}}
    )
    assert removed.metadata.finalizers == ["a/keep"]


def test_merge_patch_replaces_lists_and_deletes_nulls(core, custom):
    custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("e1", spec={"a": [1, 2], "b": 1}))
    patched = patch_example(custom, "e1", {"spec": {"a": [3], "b": None}})  # CRs: merge-patch only
    assert patched["spec"] == {"a": [3]}


# -- Deletion, finalizers, garbage collection --------------------------------------------------


def test_finalizers_block_deletion_until_removed(core):
    created = core.create_namespaced_secret(NS, secret("s1", finalizers=["tokensync.dev/finalizer"]))
    marked = core.delete_namespaced_secret("s1", NS)
    assert marked["metadata"]["deletionTimestamp"].endswith("Z")
    assert rv(marked) > rv(created)

    again = core.delete_namespaced_secret("s1", NS)  # already marked: nothing changes
    assert rv(again) == rv(marked)
    assert core.read_namespaced_secret("s1", NS).metadata.deletion_timestamp is not None

    unmarked = core.patch_namespaced_secret("s1", NS, {"metadata": {"deletionTimestamp": None}})
    assert unmarked.metadata.deletion_timestamp is not None  # clients cannot undo the mark

    released = core.patch_namespaced_secret("s1", NS, {"metadata": {"finalizers": None}})
    assert rv(released) > rv(marked)  # the response is the final state
    with pytest.raises(ApiException) as exc_info:
        core.read_namespaced_secret("s1", NS)
    assert exc_info.value.status == 404

    core.create_namespaced_secret(NS, secret("s1"))  # the name is free again


def test_deletion_preconditions(core):
    created = core.create_namespaced_secret(NS, secret("s1"))
    core.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"a": "b"}}})
    stale = kubernetes.client.V1DeleteOptions(
        preconditions=kubernetes.client.V1Preconditions(resource_version=created.metadata.resource_version)
    )
    with pytest.raises(ApiException) as exc_info:
        core.delete_namespaced_secret("s1", NS, body=stale)
    assert exc_info.value.status == 409
    core.delete_namespaced_secret("s1", NS, body=kubernetes.client.V1DeleteOptions(
        preconditions=kubernetes.client.V1Preconditions(uid=created.metadata.uid)))  # fmt: skip


def owner_ref(name, uid, kind="KopfExample"):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "name": name, "uid": uid}


def test_deleting_an_owner_deletes_its_dependents(core, custom):
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("owner"))
    other = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("other"))
    ref, other_ref = owner_ref("owner", owner["metadata"]["uid"]), owner_ref("other", other["metadata"]["uid"])
    core.create_namespaced_secret(NS, secret("owned", ownerReferences=[ref]))
    core.create_namespaced_secret(NS, secret("shared", ownerReferences=[ref, other_ref]))
    core.create_namespaced_secret(NS, secret("guarded", ownerReferences=[ref], finalizers=["x/y"]))
    core.create_namespaced_secret("elsewhere", secret("owned", ownerReferences=[ref]))  # not in its namespace
    core.create_namespaced_secret(NS, secret("unrelated"))

    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "owner")

    names = {s.metadata.name: s for s in core.list_namespaced_secret(NS).items}
    assert set(names) == {"shared", "guarded", "unrelated"}
    assert [r.uid for r in names["shared"].metadata.owner_references] == [other["metadata"]["uid"]]
    assert names["guarded"].metadata.deletion_timestamp is not None  # being deleted, like any object
    assert core.read_namespaced_secret("owned", "elsewhere")


def test_orphan_propagation_keeps_dependents(core, custom):
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("owner"))
    core.create_namespaced_secret(NS, secret("owned", ownerReferences=[owner_ref("owner", owner["metadata"]["uid"])]))
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "owner", propagation_policy="Orphan")
    assert core.read_namespaced_secret("owned", NS)


# -- Selectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=tokensync", {"a", "b"}),
        ("app==tokensync,tier=web", {"a"}),
        ("app!=tokensync", {"c", "d"}),  # also those without the label
        ("tier", {"a", "c"}),
        ("!tier", {"b", "d"}),
        ("tier in (web, db)", {"a", "c"}),
        ("tier notin (web)", {"b", "c", "d"}),
        ("app=tokensync,tier in (db,web),!gone", {"a"}),
        ("", {"a", "b", "c", "d"}),
    ],
)
def test_label_selectors_on_list(core, selector, expected):
    for name, labels in {
        "a": {"app": "tokensync", "tier": "web"},
        "b": {"app": "tokensync"},
        "c": {"app": "other", "tier": "db"},
        "d": {},
    }.items():
        core.create_namespaced_secret(NS, secret(name, labels=labels))
    found = core.list_namespaced_secret(NS, label_selector=selector).items
    assert {s.metadata.name for s in found} == expected


def test_field_selectors_and_cluster_wide_lists(core):
    core.create_namespaced_secret(NS, secret("s1"))
    core.create_namespaced_secret("other", secret("s1"))
    core.create_namespaced_secret(
        "other", {**secret("s2"), "type": "kubernetes.io/tls", "data": {"tls.crt": "", "tls.key": ""}}
    )
    everywhere = core.list_secret_for_all_namespaces()
    assert sorted((s.metadata.namespace, s.metadata.name) for s in everywhere.items) == [
        ("default", "s1"), ("other", "s1"), ("other", "s2")]  # fmt: skip
    by_namespace = core.list_secret_for_all_namespaces(field_selector="metadata.namespace=other,metadata.name!=s2")
    assert [(s.metadata.namespace, s.metadata.name) for s in by_namespace.items] == [("other", "s1")]
    by_type = core.list_secret_for_all_namespaces(field_selector="type=kubernetes.io/tls")
    assert [s.metadata.name for s in by_type.items] == ["s2"]


def test_invalid_selector_is_a_bad_request(core):
    with pytest.raises(ApiException) as exc_info:
        core.list_namespaced_secret(NS, label_selector="a=(b")
    assert exc_info.value.status == 400


def test_selector_parsing():
    assert parse_selector("a=1, b!=2 ,c,!d,e in (x, y),f notin (z)") == [
        ("a", "=", frozenset({"1"})),
        ("b", "!=", frozenset({"2"})),
        ("c", "exists", frozenset()),
        ("d", "!", frozenset()),
        ("e", "in", frozenset({"x", "y"})),
        ("f", "notin", frozenset({"z"})),
    ]


# -- Watching ----------------------------------------------------------------------------------


def test_watch_streams_live_events_with_resource_versions(core):
    listed = core.list_namespaced_secret(NS)
    events = []
    started = threading.Event()

    def watch():
        watcher = kubernetes.watch.Watch()
        started.set()
        for event in watcher.stream(
            core.list_namespaced_secret, NS, resource_version=listed.metadata.resource_version, timeout_seconds=10
        ):
            events.append((event["type"], event["object"].metadata.name, rv(event["object"])))
            if event["type"] == "DELETED":
                watcher.stop()

    thread = threading.Thread(target=watch)
    thread.start()
    started.wait()
    core.create_namespaced_secret("other", secret("s1"))  # out of the watched namespace
    written = [
        rv(core.create_namespaced_secret(NS, secret("s1", finalizers=["x/y"]))),
        rv(core.patch_namespaced_secret("s1", NS, {"stringData": {"token": "t1"}})),
        rv(core.delete_namespaced_secret("s1", NS)),
        rv(core.patch_namespaced_secret("s1", NS, {"metadata": {"finalizers": None}})),
    ]
    thread.join(timeout=10)
    assert events == [
        ("ADDED", "s1", written[0]),
        ("MODIFIED", "s1", written[1]),
        ("MODIFIED", "s1", written[2]),  # marked for deletion
        ("DELETED", "s1", written[3]),  # the finalizer is gone: the final state, a new version
    ]


def test_watch_from_a_resource_version_replays_what_happened_since(core):
    core.create_namespaced_secret(NS, secret("old"))
    core.create_namespaced_secret(NS, secret("gone"))
    since = core.list_namespaced_secret(NS).metadata.resource_version
    core.patch_namespaced_secret("old", NS, {"metadata": {"labels": {"a": "b"}}})
    core.delete_namespaced_secret("gone", NS)
    core.create_namespaced_secret(NS, secret("new"))

    watcher = kubernetes.watch.Watch()
    stream = watcher.stream(core.list_namespaced_secret, NS, resource_version=since, timeout_seconds=1)
    replayed = [(e["type"], e["object"].metadata.name) for e in stream]
    assert replayed == [("MODIFIED", "old"), ("DELETED", "gone"), ("ADDED", "new")]

    fresh = [(e["type"], e["object"].metadata.name)
             for e in watcher.stream(core.list_namespaced_secret, NS, timeout_seconds=1)]  # fmt: skip
    assert sorted(fresh) == [("ADDED", "new"), ("ADDED", "old")]  # no version: the current state


def test_watch_with_a_label_selector_sees_objects_enter_and_leave(kube, core):
    core.create_namespaced_secret(NS, secret("s1"))
    since = core.list_namespaced_secret(NS).metadata.resource_version
    core.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"app": "tokensync"}}})
    core.patch_namespaced_secret("s1", NS, {"stringData": {"token": "t1"}})
    core.patch_namespaced_secret("s1", NS, {"metadata": {"labels": {"app": None}}})
    core.create_namespaced_secret(NS, secret("s2"))

    path = f"/api/v1/namespaces/default/secrets?watch=true&labelSelector=app%3Dtokensync&resourceVersion={since}"
    events = list(stream_json(kube, path + "&timeoutSeconds=1"))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "s1"), ("MODIFIED", "s1"), ("DELETED", "s1")]  # fmt: skip
    assert events[-1]["object"]["metadata"]["labels"] == {"app": "tokensync"}  # the last matching state
    assert int(events[-1]["object"]["metadata"]["resourceVersion"]) == int(since) + 3


def test_watch_bookmarks_and_initial_events_end(kube, core):
    core.create_namespaced_secret(NS, secret("s1"))
    kube.emulator.bookmark_interval = 0.3
    path = "/api/v1/namespaces/default/secrets?watch=true&sendInitialEvents=true&allowWatchBookmarks=true"
    events = list(stream_json(kube, path + "&timeoutSeconds=1"))

    assert events[0]["type"] == "ADDED"
    assert events[1] == {
        "type": "BOOKMARK",
        "object": {"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"resourceVersion": events[0]["object"]["metadata"]["resourceVersion"],
                                "annotations": {"k8s.io/initial-events-end": "true"}}},
    }  # fmt: skip
    assert {e["type"] for e in events[2:]} == {"BOOKMARK"}  # periodic, while idle
    assert 2 <= len(events[2:]) <= 4


# Namespaces are cluster-scoped, yet /api/v1/namespaces looks like a namespace scope to kmock:
# the emulator rewrites the path, and must keep the query (watch, selectors, versions) while at it.
# kopf's namespace observer lists and watches them when serving some namespaces, not all.


def test_watch_of_namespaces_streams_events_with_resource_versions(core):
    listed = core.list_namespace()
    events = []
    started = threading.Event()

    def watch():
        watcher = kubernetes.watch.Watch()
        started.set()
        for event in watcher.stream(
            core.list_namespace, resource_version=listed.metadata.resource_version, timeout_seconds=10
        ):
            events.append((event["type"], event["object"].kind, event["object"].metadata.name, rv(event["object"])))
            if event["type"] == "DELETED":
                watcher.stop()

    thread = threading.Thread(target=watch)
    thread.start()
    started.wait()
    written = [
        rv(core.create_namespace({"metadata": {"name": "demo"}})),
        rv(core.patch_namespace("demo", {"metadata": {"labels": {"team": "a"}}})),
    ]
    core.delete_namespace("demo")
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert events[:2] == [("ADDED", "Namespace", "demo", written[0]), ("MODIFIED", "Namespace", "demo", written[1])]
    assert events[2][:3] == ("DELETED", "Namespace", "demo")
    assert events[2][3] > written[1] and events[2][3] == int(core.list_namespace().metadata.resource_version)


def test_watch_of_namespaces_starts_with_the_existing_ones_and_sends_bookmarks(kube, core):
    core.create_namespace({"metadata": {"name": "demo"}})
    kube.emulator.bookmark_interval = 0.3
    path = "/api/v1/namespaces?watch=true&allowWatchBookmarks=true&timeoutSeconds=1"
    events = list(stream_json(kube, path))

    added = {e["object"]["metadata"]["name"]: e["object"] for e in events if e["type"] == "ADDED"}
    assert [e["type"] for e in events[:2]] == ["ADDED", "ADDED"]  # no list in between: a watch stream
    assert set(added) == {"default", "demo"}
    assert {(o["kind"], o["status"]["phase"]) for o in added.values()} == {("Namespace", "Active")}
    assert all(o["metadata"]["resourceVersion"].isdigit() for o in added.values())
    assert {e["type"] for e in events[2:]} == {"BOOKMARK"}
    assert events[-1]["object"]["kind"] == "Namespace"

    since = added["default"]["metadata"]["resourceVersion"]  # demo was created after it
    replayed = stream_json(kube, f"/api/v1/namespaces?watch=true&resourceVersion={since}&timeoutSeconds=0.2")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in replayed] == [("ADDED", "demo")]


def test_selectors_on_namespaces(kube, core):
    core.create_namespace({"metadata": {"name": "demo", "labels": {"team": "a"}}})
    core.create_namespace({"metadata": {"name": "other"}})

    assert [n.metadata.name for n in core.list_namespace(field_selector="metadata.name=demo").items] == ["demo"]
    assert [n.metadata.name for n in core.list_namespace(label_selector="team=a").items] == ["demo"]
    assert [n.metadata.name for n in core.list_namespace(label_selector="team!=a").items] == ["default", "other"]

    since = core.list_namespace().metadata.resource_version
    core.patch_namespace("other", {"metadata": {"labels": {"team": "b"}}})
    core.patch_namespace("demo", {"metadata": {"labels": {"team": "c"}}})
    core.delete_namespace("demo")
    expected = {
        "fieldSelector=metadata.name%3Ddemo": [("MODIFIED", "demo"), ("DELETED", "demo")],  # `kubectl get ns demo -w`
        "labelSelector=team": [("ADDED", "other"), ("MODIFIED", "demo"), ("DELETED", "demo")],  # other got the label
    }
    for query, events in expected.items():
        path = f"/api/v1/namespaces?watch=true&{query}&resourceVersion={since}&timeoutSeconds=0.2"
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in stream_json(kube, path)] == events


# -- Discovery, CRDs, and clients --------------------------------------------------------------


def test_crds_are_established_and_discoverable(kube, custom):
    crd = kubernetes.client.ApiextensionsV1Api(custom.api_client).read_custom_resource_definition(
        "kopfexamples.kopf.dev"
    )
    assert {c.type: c.status for c in crd.status.conditions} == {"NamesAccepted": "True", "Established": "True"}
    assert crd.metadata.generation == 1

    resources = get_json(kube, "/apis/kopf.dev/v1")["resources"]
    assert {r["name"] for r in resources} == {"kopfexamples", "kopfexamples/status"}
    main = next(r for r in resources if r["name"] == "kopfexamples")
    assert main["kind"] == "KopfExample"
    assert main["namespaced"] is True
    assert {"list", "watch", "patch"} <= set(main["verbs"])  # kopf serves only such resources

    core_names = {r["name"] for r in get_json(kube, "/api/v1")["resources"]}
    assert {"namespaces", "namespaces/status", "secrets", "events"} <= core_names
    groups = {g["name"] for g in get_json(kube, "/apis")["groups"]}
    assert {"kopf.dev", "apiextensions.k8s.io", "events.k8s.io"} <= groups


def test_crds_posted_through_the_api_are_served_too(kube_api):
    extensions = kubernetes.client.ApiextensionsV1Api(kube_api)
    extensions.create_custom_resource_definition(make_crd("example.com", "widgets", "Widget", namespaced=False))
    custom = CustomObjectsApi(kube_api)
    custom.create_cluster_custom_object("example.com", "v1", "widgets", {"metadata": {"name": "w1"}})
    assert custom.get_cluster_custom_object("example.com", "v1", "widgets", "w1")["kind"] == "Widget"


def test_project_crds_are_preloaded(kube):
    names = {crd["metadata"]["name"] for crd in kube.call(list_crds(kube.emulator))}
    assert "oauthcredentials.tokensync.dev" in names


async def list_crds(emulator):
    return [obj.raw for key, obj in emulator.objects.items() if key[0].plural == "customresourcedefinitions"]


def test_kubeconfig_file_works_with_the_client(kube, tmp_path):
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(kube.write_kubeconfig(tmp_path / "kubeconfig")), client_configuration=config)
    assert config.host == kube.url
    with kubernetes.client.ApiClient(config) as client:
        assert [n.metadata.name for n in CoreV1Api(client).list_namespace().items] == ["default"]


async def test_serving_in_the_current_loop():
    # For async tests & `tokensync demo`: the same emulator, served from the running loop.
    async with serve_cluster(namespaces=["default", "tokensync"]) as cluster:
        assert isinstance(cluster, RunningCluster)
        assert isinstance(cluster.emulator, ClusterEmulator)
        with kubernetes.client.ApiClient(cluster.kube_configuration()) as client:
            namespaces = await asyncio.to_thread(CoreV1Api(client).list_namespace)
        assert [n.metadata.name for n in namespaces.items] == ["default", "tokensync"]
        assert namespaces.items[0].status.phase == "Active"


# -- Cost per request stays flat over a long run -------------------------------------------------


def test_request_history_is_bounded_so_a_long_run_does_not_slow_down(kube, core):
    """kmock matches each request against every recorded one; the emulator keeps only the newest."""
    core.create_namespaced_secret(NS, secret("s1"))
    history = kube.emulator.request_history
    for _ in range(4 * history):
        assert core.read_namespaced_secret("s1", NS).metadata.name == "s1"
    recorded = list(kube.emulator)
    assert history <= len(recorded) <= 2 * history
    # The newest requests are the ones kept, for assertions on what just happened.
    assert recorded[-1].name == "s1" and recorded[-1].method == "GET"
