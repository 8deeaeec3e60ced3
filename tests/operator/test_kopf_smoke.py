"""Unmodified kopf against the API emulator: a tiny throwaway operator, run by KopfRunner.

If kopf works here, the emulator speaks enough Kubernetes for tokensync's operator: discovery,
CRD watching, namespace watching (for --namespace), list+watch with resourceVersions, merge- &
JSON-patches with resourceVersion tests, the status subresource, finalizers, deletion, and Event
posting.
"""

from __future__ import annotations

import json

import kopf
import pytest
from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi

from support.kube import KOPFEXAMPLES_CRD, kopf_running, kopf_settings, wait_for

GROUP, VERSION, PLURAL, NS = "kopf.dev", "v1", "kopfexamples", "default"
PREFIX = "tokensync.dev"


def make_operator(kube, deleted: list[str]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()  # not the global one: other tests register tokensync's handlers
    kube.login_kopf(registry)

    @kopf.index(GROUP, VERSION, PLURAL, id="fields", registry=registry)
    def fields(name, spec, **_):  # kopf holds all handlers until indexes see the initial listing end
        return {name: spec.get("field")}

    @kopf.on.create(GROUP, VERSION, PLURAL, id="greet", registry=registry)
    def greet(spec, body, fields, **_):
        assert fields  # the index includes this very object
        kopf.info(body, reason="Greeted", message=f"hello {spec['field']}")  # posted as a v1 Event
        return {"message": f"hello {spec['field']}"}  # lands in status.greet

    @kopf.on.delete(GROUP, VERSION, PLURAL, id="farewell", registry=registry)
    def farewell(name, **_):
        deleted.append(name)

    return registry


def example(name):
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "KopfExample",
        "metadata": {"name": name},
        "spec": {"field": "world"},
    }


@pytest.mark.parametrize("initial_streaming", [False, True], ids=["list-then-watch", "initial-streaming"])
def test_kopf_creates_finalizes_and_deletes(kube, kube_api, initial_streaming):
    kube.call(kube.emulator.add_crd(KOPFEXAMPLES_CRD))
    custom, core = CustomObjectsApi(kube_api), CoreV1Api(kube_api)
    deleted: list[str] = []
    settings = kopf_settings(PREFIX)
    settings.watching.initial_streaming = initial_streaming  # sendInitialEvents & its end bookmark

    with kopf_running(make_operator(kube, deleted), settings) as runner:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("ex1"))

        def greeted():
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "ex1")
            return obj if "greet" in obj.get("status", {}) else None

        obj = wait_for(greeted)
        assert obj["status"]["greet"] == {"message": "hello world"}
        assert obj["metadata"]["finalizers"] == [f"{PREFIX}/finalizer"]
        assert obj["metadata"]["annotations"] == {
            f"{PREFIX}/kopf-managed": "yes",
            f"{PREFIX}/last-handled-configuration": json.dumps({"spec": {"field": "world"}}, separators=(",", ":"))
            + "\n",
        }
        assert obj["metadata"]["generation"] == 1  # kopf's own writes touched no spec

        events = wait_for(lambda: core.list_namespaced_event(NS).items)
        assert [(e.reason, e.message, e.type) for e in events] == [("Greeted", "hello world", "Normal")]
        assert events[0].involved_object.uid == obj["metadata"]["uid"]

        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "ex1")
        wait_for(lambda: deleted)

        def gone():
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "ex1")
            except ApiException as exc:
                return exc.status == 404
            return False

        wait_for(gone)

    assert deleted == ["ex1"]
    assert runner.exception is None
    requests = [r for r in kube.emulator if r.resource == f"{GROUP}/{VERSION}/{PLURAL}" and r.action]
    calls = {(r.action.value, r.params.get("sendInitialEvents")) for r in requests}
    assert (("LIST", None) in calls) is not initial_streaming
    assert (("WATCH", "true") in calls) is initial_streaming
    assert "Traceback" not in runner.output
    assert "Handler 'farewell' succeeded." in runner.output

    # What kopf wrote over the object's life: finalizer, then its bookkeeping annotations, then
    # the handler's result into status; deletion marked it; kopf removed its finalizer.
    history = [v.raw for v in kube.emulator.objects[f"{GROUP}/{VERSION}/{PLURAL}", NS, "ex1"].history if v]
    assert [sorted(v["metadata"].get("annotations", {})) for v in history][-1] == [
        f"{PREFIX}/kopf-managed",
        f"{PREFIX}/last-handled-configuration",
    ]
    assert [v["metadata"].get("finalizers") for v in history][-1] is None
    assert "deletionTimestamp" in history[-1]["metadata"]


@pytest.mark.timeout(60)
def test_kopf_serves_a_crd_added_while_it_runs(kube, kube_api):
    custom = CustomObjectsApi(kube_api)
    deleted: list[str] = []

    with kopf_running(make_operator(kube, deleted), kopf_settings(PREFIX)):
        kube.call(kube.emulator.add_crd(KOPFEXAMPLES_CRD))  # kopf watches CRDs and rescans the API
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, example("late"))

        def greeted():
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "late")
            return obj.get("status", {}).get("greet")

        assert wait_for(greeted, timeout=20) == {"message": "hello world"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("demo_exists", [True, False], ids=["demo-exists", "demo-created-later"])
def test_kopf_serves_only_its_namespaces(kube, kube_api, demo_exists):
    # `kopf run --namespace demo` with scanning on (the default): kopf lists & watches namespaces
    # to learn which of its patterns exist, and watches the resources in those only.
    kube.call(kube.emulator.add_crd(KOPFEXAMPLES_CRD))
    custom, core = CustomObjectsApi(kube_api), CoreV1Api(kube_api)
    settings = kopf_settings(PREFIX)
    assert not settings.scanning.disabled
    core.create_namespace({"metadata": {"name": "other"}})
    if demo_exists:
        core.create_namespace({"metadata": {"name": "demo"}})

    with kopf_running(make_operator(kube, []), settings, args=("--namespace", "demo", "--verbose")) as runner:
        custom.create_namespaced_custom_object(GROUP, VERSION, "other", PLURAL, example("ignored"))
        if not demo_exists:  # only the namespace watch tells kopf about it
            core.create_namespace({"metadata": {"name": "demo"}})
        custom.create_namespaced_custom_object(GROUP, VERSION, "demo", PLURAL, example("served"))

        def greeted():
            return custom.get_namespaced_custom_object(GROUP, VERSION, "demo", PLURAL, "served").get("status")

        assert wait_for(greeted, timeout=20) == {"greet": {"message": "hello world"}}

    assert runner.exception is None
    ignored = custom.get_namespaced_custom_object(GROUP, VERSION, "other", PLURAL, "ignored")
    assert "status" not in ignored
    assert not {"finalizers", "annotations"} & set(ignored["metadata"])
    kopfs = [r for r in kube.emulator if r.headers.get("User-Agent", "").startswith("kopf/") and r.resource]
    assert {r.namespace for r in kopfs if r.resource.plural == PLURAL} == {"demo"}  # never `other`
    assert {r.action.value for r in kopfs if r.resource.plural == "namespaces"} == {"LIST", "WATCH"}
    errors = [line for line in runner.output.splitlines() if "ERROR" in line or "Traceback" in line]
    assert not errors
