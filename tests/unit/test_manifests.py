"""The install manifests (manifests/), the examples (examples/) and the image (Dockerfile).

No cluster is needed and no binary is ever downloaded: kustomize builds are checked
with :class:`Kustomize`, a small renderer of exactly the kustomize features the
manifests use (resources, components, JSON 6902 patches), with kustomize's loading
rules that bite (no file outside a kustomization's root, no absolute roots, no base
that contains the kustomization referring to it). Anything else in a kustomization is
an error here, so a new feature cannot slip in untested. When ``kustomize`` or
``kubectl`` (which embeds kustomize) is on PATH, its output must equal this renderer's.

Objects are checked against the Kubernetes API types through the official client's
models (unknown or mistyped fields fail), the ClusterRole against the calls the code
makes (derived from kopf's handler registry and from recording every request of
:class:`~tokensync.controller.kube.KubeClient`), and every example against the
pydantic model the operator validates with, plus the CRD's OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import inspect
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes.client
import pytest
import yaml

from support.rbac import rule_of
from tokensync.controller.kube import KubeClient
from tokensync.controller.templates import compile_template, render_templates
from tokensync.models.credential import ClientAuthMethod, GrantType, OAuthCredential

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
EXAMPLES = ROOT / "examples"
CRDS = ROOT / "crds"

IMAGE = "ghcr.io/tokensync/tokensync:0.1.0"
NAMESPACE = "tokensync-system"
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

Obj = dict[str, Any]
Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


# -- a small, strict kustomize ---------------------------------------------------------------


class KustomizeError(Exception):
    pass


def _load_docs(path: Path) -> list[Obj]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    for doc in docs:
        if not isinstance(doc, dict):
            raise KustomizeError(f"{path}: a document is not a mapping")
    return docs


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _index(container: list[Any], token: str, *, allow_end: bool) -> int:
    if allow_end and token == "-":
        return len(container)
    if not re.fullmatch(r"0|[1-9][0-9]*", token):
        raise KustomizeError(f"{token!r} is not an array index")
    index = int(token)
    if index > len(container) or (index == len(container) and not allow_end):
        raise KustomizeError(f"index {index} out of range")
    return index


def apply_json6902(doc: Obj, operations: list[Obj]) -> Obj:
    """RFC 6902 add/remove/replace/test, as kustomize applies them (all or nothing)."""
    result = copy.deepcopy(doc)
    for op in operations:
        kind, parts = op.get("op"), _pointer(op["path"])
        parent: Any = result
        for token in parts[:-1]:
            parent = parent[_index(parent, token, allow_end=False)] if isinstance(parent, list) else parent[token]
        last = parts[-1]
        if kind == "add":
            if isinstance(parent, list):
                parent.insert(_index(parent, last, allow_end=True), copy.deepcopy(op["value"]))
            else:
                parent[last] = copy.deepcopy(op["value"])
        elif kind in ("replace", "remove", "test"):
            key: Any = _index(parent, last, allow_end=False) if isinstance(parent, list) else last
            if not isinstance(parent, list) and key not in parent:
                raise KustomizeError(f"{kind} {op['path']}: no such member")
            if kind == "replace":
                parent[key] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[key]
            elif parent[key] != op["value"]:
                raise KustomizeError(f"test {op['path']}: {parent[key]!r} != {op['value']!r}")
        else:
            raise KustomizeError(f"JSON patch op {kind!r} is not supported here")
    return result


def _gvk(obj: Obj) -> tuple[str, str, str]:
    group, _, version = obj["apiVersion"].rpartition("/")
    return group, version, obj["kind"]


def res_id(obj: Obj) -> tuple[str, str, str, str]:
    """kustomize's resource id: group, kind, namespace, name (the version does not count)."""
    meta = obj.get("metadata") or {}
    return (_gvk(obj)[0], obj["kind"], meta.get("namespace") or "", meta.get("name") or "")


class Kustomize:
    """``kustomize build`` for resources, components and JSON 6902 patches; strict about the rest."""

    KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "resources", "components", "patches"})
    TARGET_FIELDS = frozenset({"group", "version", "kind", "name", "namespace"})

    @staticmethod
    def kustomization_file(directory: Path) -> Path:
        found = [directory / name for name in KUSTOMIZATION_NAMES if (directory / name).is_file()]
        if len(found) != 1:
            raise KustomizeError(f"{directory}: expected exactly one of {KUSTOMIZATION_NAMES}, found {found}")
        return found[0]

    def build(self, directory: Path) -> list[Obj]:
        return self._build(directory.resolve(), kind="Kustomization", visited=())

    def _build(self, root: Path, *, kind: str, visited: tuple[Path, ...], into: list[Obj] | None = None) -> list[Obj]:
        for seen in visited:
            if root == seen or root in seen.parents:
                raise KustomizeError(f"cycle detected: candidate root {root} contains visited root {seen}")
        spec = _load_docs(self.kustomization_file(root))
        if len(spec) != 1:
            raise KustomizeError(f"{root}: a kustomization is one document")
        k = spec[0]
        expected_api = (
            "kustomize.config.k8s.io/v1beta1" if kind == "Kustomization" else "kustomize.config.k8s.io/v1alpha1"
        )
        if (k.get("apiVersion"), k.get("kind")) != (expected_api, kind):
            raise KustomizeError(f"{root}: expected {expected_api} {kind}, got {k.get('apiVersion')} {k.get('kind')}")
        unknown = set(k) - self.KUSTOMIZATION_FIELDS
        if unknown:
            raise KustomizeError(f"{root}: fields this renderer does not implement: {sorted(unknown)}")
        objects: list[Obj] = into if into is not None else []
        for entry in k.get("resources") or []:
            if Path(entry).is_absolute():
                raise KustomizeError(f"{root}: new root {entry!r} cannot be absolute")
            path = (root / entry).resolve()
            if path.is_dir():
                added = self._build(path, kind="Kustomization", visited=(*visited, root))
            elif path.is_file():
                if root not in path.parents:
                    raise KustomizeError(f"security; file '{path}' is not in or below '{root}'")
                added = _load_docs(path)
            else:
                raise KustomizeError(f"{root}: resource {entry!r} does not exist")
            for obj in added:
                if any(res_id(obj) == res_id(other) for other in objects):
                    raise KustomizeError(f"may not add resource with an already registered id: {res_id(obj)}")
                objects.append(obj)
        for entry in k.get("components") or []:
            if Path(entry).is_absolute():
                raise KustomizeError(f"{root}: new root {entry!r} cannot be absolute")
            path = (root / entry).resolve()
            if not path.is_dir():
                raise KustomizeError(f"{root}: component {entry!r} is not a directory")
            self._build(path, kind="Component", visited=(*visited, root), into=objects)
        for patch in k.get("patches") or []:
            self._patch(root, patch, objects)
        return objects

    def _patch(self, root: Path, patch: Obj, objects: list[Obj]) -> None:
        if set(patch) - {"target", "patch", "path"} or ("patch" in patch) == ("path" in patch):
            raise KustomizeError(f"{root}: a patch needs a target and exactly one of patch/path: {patch}")
        target = patch.get("target") or {}
        if not target or set(target) - self.TARGET_FIELDS:
            raise KustomizeError(f"{root}: patch targets here select by {sorted(self.TARGET_FIELDS)} only")
        if "path" in patch:
            path = (root / patch["path"]).resolve()
            if root not in path.parents:
                raise KustomizeError(f"security; file '{path}' is not in or below '{root}'")
            text = path.read_text(encoding="utf-8")
        else:
            text = patch["patch"]
        operations = yaml.safe_load(text)
        if not isinstance(operations, list):
            raise KustomizeError(f"{root}: only JSON 6902 patches (a list of operations) are implemented here")
        matched = 0
        for i, obj in enumerate(objects):
            group, version, kind = _gvk(obj)
            meta = obj.get("metadata") or {}
            actual = {"group": group, "version": version, "kind": kind, **meta}
            if all(actual.get(field, "") == value for field, value in target.items()):
                objects[i] = apply_json6902(obj, operations)
                matched += 1
        if not matched:  # stricter than kustomize, which ignores it: a typo in a target must fail
            raise KustomizeError(f"{root}: patch target {target} matches nothing")


def build(directory: Path) -> list[Obj]:
    return Kustomize().build(directory)


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [obj for obj in by_kind(objects, kind) if name is None or obj["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def ids(objects: list[Obj]) -> set[tuple[str, str, str, str]]:
    return {res_id(obj) for obj in objects}


def container(deployment: Obj) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["tokensync"]
    return containers[0]


# -- the renderer itself ---------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_renderer_enforces_kustomize_loading_rules(tmp_path):
    obj = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: x}\n"
    head = "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
    _write(tmp_path / "outside.yaml", obj)
    _write(tmp_path / "app" / "kustomization.yaml", head + "resources: [../outside.yaml]\n")
    with pytest.raises(KustomizeError, match="not in or below"):
        build(tmp_path / "app")
    _write(tmp_path / "kustomization.yaml", head + "resources: [outside.yaml]\n")
    _write(tmp_path / "over" / "kustomization.yaml", head + "resources: [..]\n")
    with pytest.raises(KustomizeError, match="cycle detected"):
        build(tmp_path / "over")
    _write(tmp_path / "sib" / "kustomization.yaml", head + "resources: [../app2]\n")
    _write(tmp_path / "app2" / "Kustomization", head + "resources: [cm.yaml, cm.yaml]\n")
    _write(tmp_path / "app2" / "cm.yaml", obj)
    with pytest.raises(KustomizeError, match="already registered"):
        build(tmp_path / "sib")
    _write(tmp_path / "abs" / "kustomization.yaml", head + f"resources: [{tmp_path / 'app2'}]\n")
    with pytest.raises(KustomizeError, match="cannot be absolute"):
        build(tmp_path / "abs")
    _write(tmp_path / "odd" / "kustomization.yaml", head + "namePrefix: x-\n")
    with pytest.raises(KustomizeError, match="does not implement"):
        build(tmp_path / "odd")


def test_json6902_operations():
    doc = {"a": {"list": [1, 2], "x": "y"}}
    out = apply_json6902(
        doc,
        [
            {"op": "test", "path": "/a/x", "value": "y"},
            {"op": "add", "path": "/a/list/-", "value": 3},
            {"op": "add", "path": "/a/list/0", "value": 0},
            {"op": "replace", "path": "/a/x", "value": "z"},
            {"op": "add", "path": "/a/new~1key", "value": {}},
            {"op": "remove", "path": "/a/list/1"},
        ],
    )
    assert out == {"a": {"list": [0, 2, 3], "x": "z", "new/key": {}}}
    assert doc == {"a": {"list": [1, 2], "x": "y"}}
    with pytest.raises(KustomizeError, match="test"):
        apply_json6902(doc, [{"op": "test", "path": "/a/x", "value": "nope"}])
    with pytest.raises(KustomizeError, match="out of range"):
        apply_json6902(doc, [{"op": "replace", "path": "/a/list/2", "value": 0}])


# -- every YAML parses, every kustomization builds -------------------------------------------


def _yaml_files(*roots: Path) -> list[Path]:
    return sorted(p for root in roots for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _kustomization_dirs() -> list[Path]:
    return sorted({p.parent for name in KUSTOMIZATION_NAMES for p in MANIFESTS.rglob(name)})


@pytest.mark.parametrize("path", _yaml_files(MANIFESTS, EXAMPLES), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses_into_named_objects(path):
    docs = _load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: a document without apiVersion/kind"
        if doc["kind"] not in ("Kustomization", "Component"):
            assert (doc.get("metadata") or {}).get("name"), f"{path}: a {doc['kind']} without metadata.name"


def test_variants_build():
    layout = {str(d.relative_to(MANIFESTS)) for d in _kustomization_dirs()}
    assert layout == {
        ".",
        "operator",
        "rbac",
        "overlays/namespaced",
        "overlays/redis",
        "components/redis",
        "monitoring",
    }
    for directory in ("", "overlays/namespaced", "overlays/redis"):
        assert build(MANIFESTS / directory)


def test_every_manifest_file_is_used():
    """No orphan: each YAML file under manifests/ is a kustomization or listed by one."""
    listed: set[Path] = set()
    for directory in _kustomization_dirs():
        for k in _load_docs(Kustomize.kustomization_file(directory)):
            listed |= {(directory / entry).resolve() for entry in k.get("resources") or []}
    for path in _yaml_files(MANIFESTS):
        assert path.name in KUSTOMIZATION_NAMES or path.resolve() in listed, f"{path} is not in any kustomization"


def test_crd_is_included_from_crds_not_copied():
    crds = [p for p in _yaml_files(MANIFESTS) for doc in _load_docs(p) if doc["kind"] == "CustomResourceDefinition"]
    assert crds == [], "the CRD must come from crds/ (../crds), never a copy under manifests/"
    # crds/Kustomization has no .yaml extension: `kubectl apply -f crds/` skips it.
    assert Kustomize.kustomization_file(CRDS).name == "Kustomization"
    crd_docs = _load_docs(CRDS / "oauthcredential.yaml")
    assert build(CRDS) == crd_docs
    assert by_kind(build(MANIFESTS), "CustomResourceDefinition") == crd_docs
    assert by_kind(build(MANIFESTS / "overlays" / "namespaced"), "CustomResourceDefinition") == crd_docs


def _external_kustomize() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def with_monitoring(directory: Path) -> Path:
    """A user's kustomization: the default install plus the monitoring Component (relative
    paths: kustomize refuses absolute ones)."""
    relative = Path(os.path.relpath(MANIFESTS, directory))
    return _write(
        directory / "kustomization.yaml",
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{relative}]\ncomponents: [{relative / 'monitoring'}]\n",
    ).parent


@pytest.mark.skipif(_external_kustomize() is None, reason="no kustomize/kubectl binary (not downloaded by tests)")
@pytest.mark.parametrize("variant", ["", "overlays/namespaced", "overlays/redis", "+monitoring"])
def test_real_kustomize_agrees(variant, tmp_path):
    command = _external_kustomize()
    assert command is not None
    directory = with_monitoring(tmp_path) if variant == "+monitoring" else MANIFESTS / variant
    out = subprocess.run([*command, str(directory)], capture_output=True, text=True, check=True, timeout=60)
    theirs = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    ours = build(directory)
    assert sorted(theirs, key=res_id) == sorted(ours, key=res_id)


# -- Kubernetes API types ----------------------------------------------------------------------


def _model_name(obj: Obj) -> str | None:
    _, version, kind = _gvk(obj)
    name = version[:1].upper() + version[1:] + kind
    return name if hasattr(kubernetes.client.models, name) else None


def _round_trip(obj: Obj) -> Any:
    client = kubernetes.client.ApiClient()
    model_name = _model_name(obj)
    assert model_name is not None, f"no kubernetes client model for {obj['apiVersion']} {obj['kind']}"
    model = client._ApiClient__deserialize(obj, model_name)  # type: ignore[attr-defined]
    return client.sanitize_for_serialization(model)


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key not in b:
                out.append(f"{path}.{key}: not a field of this type")
            elif key not in a:
                out.append(f"{path}.{key}: added by the model")
            else:
                out.extend(_diff(a[key], b[key], f"{path}.{key}"))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} became {b!r}"]


def _all_rendered() -> Iterator[tuple[str, Obj]]:
    seen: set[str] = set()
    for variant in ("", "overlays/namespaced", "overlays/redis"):
        for obj in build(MANIFESTS / variant):
            key = json.dumps(obj, sort_keys=True)
            if key not in seen:
                seen.add(key)
                yield f"{variant or 'base'}:{obj['kind']}/{obj['metadata']['name']}", obj


def _example_objects() -> Iterator[tuple[str, Obj]]:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for obj in _load_docs(path):
            yield f"{path.name}:{obj['kind']}/{obj['metadata']['name']}", obj


@pytest.mark.parametrize(
    ("label", "obj"),
    [
        item
        for item in [*_all_rendered(), *_example_objects()]
        if item[1]["kind"] != "OAuthCredential"  # no client model; validated against the CRD below
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_objects_match_the_kubernetes_api_types(label, obj):
    """Deserialised into the official client's models and back: an unknown or
    mistyped field is dropped or rejected, and shows up as a difference."""
    problems = _diff(obj, _round_trip(obj))
    assert not problems, f"{label}:\n" + "\n".join(problems)


def test_round_trip_catches_mistakes():
    deployment = copy.deepcopy(one(build(MANIFESTS), "Deployment"))
    container(deployment)["securityContext"]["readOnlyRootFileSystem"] = True  # wrong case
    assert any("readOnlyRootFileSystem" in p for p in _diff(deployment, _round_trip(deployment)))
    service = copy.deepcopy(one(build(MANIFESTS), "Service"))
    service["spec"]["ports"][0]["port"] = "8080"
    with pytest.raises(Exception, match="port"):
        _round_trip(service)


# -- the default install -----------------------------------------------------------------------


def test_base_objects():
    assert ids(build(MANIFESTS)) == {
        ("apiextensions.k8s.io", "CustomResourceDefinition", "", "oauthcredentials.tokensync.dev"),
        ("", "Namespace", "", NAMESPACE),
        ("", "ServiceAccount", NAMESPACE, "tokensync"),
        ("apps", "Deployment", NAMESPACE, "tokensync"),
        ("", "Service", NAMESPACE, "tokensync-metrics"),
        ("rbac.authorization.k8s.io", "ClusterRole", "", "tokensync"),
        ("rbac.authorization.k8s.io", "ClusterRoleBinding", "", "tokensync"),
    }


def test_deployment_runs_one_hardened_operator():
    objects = build(MANIFESTS)
    deployment = one(objects, "Deployment", "tokensync")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount")["metadata"]["name"]
    c = container(deployment)
    assert c["image"] == IMAGE
    assert c["args"] == ["--liveness=http://0.0.0.0:8080/healthz", "-A"]
    assert "command" not in c, "the image's ENTRYPOINT is `tokensync run`"
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}
    assert {"name": "http-metrics", "containerPort": 9090, "protocol": "TCP"} in c["ports"]
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in c["ports"]

    hardening = {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert hardening.items() <= c["securityContext"].items()
    assert not c["securityContext"].get("privileged")
    pod_context = {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod_context.items() <= pod["securityContext"].items()

    # /tmp is the one writable place (the image's HOME and TMPDIR).
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert set(mounts) == {"/tmp"}


def test_metrics_service_reaches_the_pod():
    objects = build(MANIFESTS)
    service = one(objects, "Service", "tokensync-metrics")
    deployment = one(objects, "Deployment", "tokensync")
    assert service["spec"]["ports"] == [
        {"name": "http-metrics", "port": 9090, "targetPort": "http-metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert "http-metrics" in {p["name"] for p in container(deployment)["ports"]}


def test_namespace_enforces_restricted_pod_security():
    labels = one(build(MANIFESTS), "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_objects_name_their_namespace_themselves():
    """No namespace transformer: namespaced objects carry their namespace, cluster-scoped ones none."""
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    for variant in ("", "overlays/namespaced", "overlays/redis"):
        for obj in build(MANIFESTS / variant):
            namespace = obj["metadata"].get("namespace")
            assert (namespace is None) == (obj["kind"] in cluster_scoped), (variant, res_id(obj))


# -- RBAC: exactly what the code calls ----------------------------------------------------------


def _rules(role: Obj) -> set[Rule]:
    out: set[Rule] = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"no resourceNames/nonResourceURLs: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"no wildcards: {rule}"
                    out.add((group, resource, verb))
    return out


CONTROLLER_RULES: set[Rule] = {
    ("", "secrets", "get"),
    ("", "secrets", "list"),
    ("", "secrets", "create"),
    ("", "secrets", "update"),
    ("", "secrets", "delete"),
    ("tokensync.dev", "oauthcredentials/status", "patch"),
    ("", "events", "create"),
}
KOPF_WATCH_RULES: set[Rule] = {
    ("tokensync.dev", "oauthcredentials", "list"),
    ("tokensync.dev", "oauthcredentials", "watch"),
    ("", "secrets", "list"),
    ("", "secrets", "watch"),
}
KOPF_CLUSTER_RULES: set[Rule] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}


def test_clusterrole_rules():
    role = one(build(MANIFESTS), "ClusterRole", "tokensync")
    assert _rules(role) == CONTROLLER_RULES | KOPF_WATCH_RULES | KOPF_CLUSTER_RULES
    binding = one(build(MANIFESTS), "ClusterRoleBinding", "tokensync")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tokensync"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tokensync", "namespace": NAMESPACE}]


def test_kube_client_calls_are_exactly_the_controller_rules():
    """Every method of KubeClient, called against a recording transport."""
    seen: set[Rule] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        rule = rule_of(request.method, str(request.url))
        assert rule is not None
        seen.add(rule)
        body: Obj = {"items": [], "metadata": {}} if request.method == "GET" else {"metadata": {"name": "x"}}
        return httpx.Response(200, json=body)

    calls = {
        "read_secret": ("ns", "s"),
        "list_secrets": ("ns",),
        "create_secret": ("ns", {}),
        "replace_secret": ("ns", "s", {}),
        "delete_secret": ("ns", "s"),
        "patch_credential_status": ("ns", "c", {}),
        "create_event": ("ns", {}),
    }
    public = {
        name
        for name, fn in inspect.getmembers(KubeClient, inspect.iscoroutinefunction)
        if not name.startswith("_") and name != "close"
    }
    assert public == set(calls), "a new KubeClient call: add it here and to manifests/rbac/clusterrole.yaml"

    async def run() -> None:
        client = KubeClient(httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="https://k8s.test"))
        try:
            for name, args in calls.items():
                kwargs = {"label_selector": "tokensync.dev/role"} if name == "list_secrets" else {}
                await getattr(client, name)(*args, **kwargs)
            await client.list_secrets(None, label_selector="tokensync.dev/role")  # cluster-wide prime
        finally:
            await client.close()

    asyncio.run(run())
    assert seen == CONTROLLER_RULES


def test_kopf_needs_only_list_and_watch():
    """The kopf handlers are raw on.event watchers only: kopf then lists and watches, and
    never patches (no progress/diff-base annotations, no finalizers)."""
    from kopf._cogs.structs import references

    from tokensync.handlers import REGISTRY as registry  # what `tokensync run` passes to kopf.operator

    assert not registry._changing.get_all_handlers(), "on.create/update/delete: kopf would need patch on the CR"
    assert not registry._spawning.get_all_handlers(), "daemons/timers: kopf would need patch on the CR"
    assert not registry._webhooks.get_all_handlers(), "webhooks: kopf would need admissionregistration rights"
    assert not registry._indexing.get_all_handlers()
    watched: set[Rule] = set()
    for handler in registry._watching.get_all_handlers():
        selector = handler.selector
        assert selector is not None
        for verb in ("list", "watch"):
            watched.add((selector.group or "", selector.plural or selector.any_name or "", verb))
    assert watched == KOPF_WATCH_RULES
    crds = references.CRDS
    assert {(crds.group or "", crds.any_name or "", v) for v in ("list", "watch")} == KOPF_CLUSTER_RULES


def test_clusterrole_comments_name_the_code_paths():
    text = (MANIFESTS / "rbac" / "clusterrole.yaml").read_text()
    for needle in (
        "kube.py",
        "patch_credential_status",
        "read_secret",
        "list_secrets",
        "create_event",
        "observation.py",
    ):
        assert needle in text


# -- variants ---------------------------------------------------------------------------------------


def test_namespaced_overlay():
    objects = build(MANIFESTS / "overlays" / "namespaced")
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    role, binding = one(objects, "Role"), one(objects, "RoleBinding")
    namespace = role["metadata"]["namespace"]
    assert namespace != NAMESPACE
    assert binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tokensync"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tokensync", "namespace": NAMESPACE}]
    # The ClusterRole minus what is cluster-scoped (a Role cannot grant it).
    assert _rules(role) == CONTROLLER_RULES | KOPF_WATCH_RULES
    args = container(one(objects, "Deployment"))["args"]
    assert args == ["--liveness=http://0.0.0.0:8080/healthz", f"--namespace={namespace}"]
    assert "-A" not in args and "--all-namespaces" not in args  # -A would win over -n
    # Everything else as in the default install.
    base = {i for i in ids(build(MANIFESTS)) if i[1] not in ("ClusterRole", "ClusterRoleBinding")}
    assert ids(objects) - {res_id(role), res_id(binding)} == base


def test_redis_overlay():
    base, objects = build(MANIFESTS), build(MANIFESTS / "overlays" / "redis")
    assert ids(objects) == ids(base)
    deployment, base_deployment = one(objects, "Deployment"), one(base, "Deployment")
    c, base_c = container(deployment), container(base_deployment)
    assert c["args"] == [*base_c["args"], "--store=redis"]
    assert c["env"] == [
        *base_c["env"],
        {"name": "TOKENSYNC_REDIS_URL", "valueFrom": {"secretKeyRef": {"name": "tokensync-redis", "key": "url"}}},
    ]
    # Nothing else changed.
    stripped = copy.deepcopy(deployment)
    container(stripped)["env"] = base_c["env"]
    container(stripped)["args"] = base_c["args"]
    assert stripped == base_deployment
    assert [o for o in objects if o["kind"] != "Deployment"] == [o for o in base if o["kind"] != "Deployment"]
    note = (MANIFESTS / "components" / "redis" / "kustomization.yaml").read_text()
    assert "not shipped" in note.lower()


def test_cli_accepts_the_deployment_args():
    """The args of every variant parse with the real `tokensync run` options."""
    from click.testing import CliRunner

    from tokensync.cli import main

    for variant in ("", "overlays/namespaced", "overlays/redis"):
        args = container(one(build(MANIFESTS / variant), "Deployment"))["args"]
        command = main.commands["run"]
        ctx = command.make_context("run", list(args), resilient_parsing=False)
        assert ctx.params["liveness"] == "http://0.0.0.0:8080/healthz"
    result = CliRunner().invoke(main, ["run", "--help"])
    assert "--liveness" in result.output


def test_monitoring_component(tmp_path):
    """Optional: not in the base, and addable as a Component to any variant."""
    assert not by_kind(build(MANIFESTS), "PrometheusRule")
    objects = build(with_monitoring(tmp_path))
    rule = one(objects, "PrometheusRule", "tokensync")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    alerts = {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}
    exprs = {r["expr"].strip() for r in alerts.values()}
    assert exprs == {
        "tokensync_credential_ready == 0",
        "tokensync_credential_expiry_timestamp_seconds - time() < 120",
        'rate(tokensync_refresh_total{outcome="failure"}[10m]) > 0',
    }
    assert alerts["TokensyncCredentialNotReady"]["for"] == "10m"
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


# -- the image --------------------------------------------------------------------------------------


def _dockerfile_stages() -> list[list[str]]:
    lines: list[str] = []
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#"):
            continue
        if lines and lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1] + " " + raw.strip()
        else:
            lines.append(raw.strip())
    stages: list[list[str]] = []
    for line in filter(None, lines):
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_matches_the_deployment():
    stages = _dockerfile_stages()
    assert len(stages) == 2
    builder, final = stages
    assert re.match(r"FROM \$\{PYTHON_IMAGE\} AS builder", builder[0])
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in (ROOT / "Dockerfile").read_text()
    assert any("pip wheel" in line for line in builder)
    joined = "\n".join(final)
    assert "USER 65532:65532" in final
    assert 'ENTRYPOINT ["tokensync", "run"]' in final
    assert "EXPOSE 8080 9090" in final
    assert "COPY --from=builder /opt/tokensync /opt/tokensync" in final
    assert "PYTHONDONTWRITEBYTECODE=1" in joined and "HOME=/tmp" in joined
    assert not re.search(r"apt-get|apk |gcc|build-essential|pip install", joined), "the final stage installs nothing"
    for label in ("title", "version", "revision", "source", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in joined
    context = one(build(MANIFESTS), "Deployment")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (65532, 65532)


def test_dockerignore():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "tests", "bench", "**/__pycache__", ".mypy_cache", ".pytest_cache"} <= entries
    assert not {"operator", "pyproject.toml", "README.md"} & entries


# -- examples ---------------------------------------------------------------------------------------

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def _crd_spec_schema() -> Obj:
    crd = _load_docs(CRDS / "oauthcredential.yaml")[0]
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _secret_values(secret: Obj) -> dict[str, str]:
    values = dict(secret.get("stringData") or {})
    values.update({k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()})
    return values


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example(path):
    docs = _load_docs(path)
    credentials = [OAuthCredential.model_validate(d) for d in docs if d["kind"] == "OAuthCredential"]
    assert len(credentials) == 1, "one OAuthCredential per example"
    credential = credentials[0]
    raw = one(docs, "OAuthCredential")
    assert "namespace" not in raw["metadata"], "examples apply into the namespace of your choice"
    # The API server's view of the same spec (OpenAPI; CEL rules are mirrored by the pydantic validators).
    jsonschema.Draft202012Validator(_crd_spec_schema()).validate(raw["spec"])

    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    refs = dict(credential.spec.grant.references())
    if credential.spec.issuer.ca_secret_ref is not None:
        refs["issuer.caSecretRef"] = credential.spec.issuer.ca_secret_ref
    for field, ref in refs.items():
        assert ref.name in secrets, f"{field} names Secret {ref.name}, which the example does not define"
        assert ref.key in _secret_values(secrets[ref.name]), f"{field}: Secret {ref.name} has no key {ref.key}"
    for secret in secrets.values():
        assert set(_secret_values(secret).values()) == {"change-me"}, "placeholders only"

    target = credential.spec.effective_target()
    target_name = target.secret_name or credential.metadata.name
    assert target_name not in secrets, "the target Secret is written by tokensync, not by the example"
    pod = one(docs, "Pod")
    volumes = [v for v in pod["spec"]["volumes"] if (v.get("secret") or {}).get("secretName") == target_name]
    assert len(volumes) == 1, "the Pod mounts the target Secret as a volume"
    for c in pod["spec"]["containers"]:
        for mount in c.get("volumeMounts") or []:
            if mount["name"] == volumes[0]["name"]:
                assert "subPath" not in mount, "subPath mounts never see a refreshed token"
        for env in c.get("env") or []:
            assert "secretKeyRef" not in (env.get("valueFrom") or {}), "env vars never see a refreshed token"
    text = path.read_text()
    explained = "subPath" in text and re.search(r"env(ironment)? var", text, re.IGNORECASE)
    assert explained, "the Pod's comment explains mounted files vs env vars and subPath"

    if target.template:
        values = {
            "access_token": "AT.x-y_z",
            "token_type": "Bearer",
            "expires_at": "2030-01-01T00:00:00Z",
            "issued_at": "2030-01-01T00:00:00Z",
            "scope": "",
            "id_token": "",
        }
        for key, source in target.template.items():
            compile_template(key, source)
        rendered = render_templates(target.template, values)
        if target.type == "kubernetes.io/dockerconfigjson":
            config = json.loads(rendered[".dockerconfigjson"])
            for auth in config["auths"].values():
                assert auth["password"] == "AT.x-y_z"
                assert base64.b64decode(auth["auth"]).decode() == f"{auth['username']}:AT.x-y_z"
        if "Authorization" in rendered:
            assert rendered["Authorization"] == "Bearer AT.x-y_z"


def _effective_method(credential: OAuthCredential) -> ClientAuthMethod:
    grant = credential.spec.grant
    if grant.client_auth_method is not None:
        return grant.client_auth_method
    if grant.private_key_ref is not None:
        return ClientAuthMethod.PRIVATE_KEY_JWT
    return ClientAuthMethod.CLIENT_SECRET_BASIC if grant.client_secret_ref else ClientAuthMethod.NONE


def test_examples_cover_every_grant_and_client_authentication():
    credentials = [
        OAuthCredential.model_validate(d)
        for p in EXAMPLE_FILES
        for d in _load_docs(p)
        if d["kind"] == "OAuthCredential"
    ]
    names = [c.metadata.name for c in credentials]
    assert len(names) == len(set(names)), "examples can all go into one namespace"
    targets = [c.spec.effective_target().secret_name or c.metadata.name for c in credentials]
    assert len(targets) == len(set(targets))
    cc_methods = {_effective_method(c) for c in credentials if c.spec.grant.type == GrantType.CLIENT_CREDENTIALS}
    assert {
        ClientAuthMethod.CLIENT_SECRET_BASIC,
        ClientAuthMethod.CLIENT_SECRET_POST,
        ClientAuthMethod.PRIVATE_KEY_JWT,
    } <= cc_methods
    passwords = [c for c in credentials if c.spec.grant.type == GrantType.PASSWORD]
    assert {c.spec.grant.totp_secret_ref is not None for c in passwords} == {True, False}
    assert any(c.spec.grant.type == GrantType.REFRESH_TOKEN for c in credentials)
    assert any(c.spec.issuer.issuer_url is not None for c in credentials)
    templates = [c.spec.effective_target() for c in credentials if c.spec.effective_target().template]
    assert any("Authorization" in (t.template or {}) for t in templates)
    assert any(
        t.type == "kubernetes.io/dockerconfigjson" and ".dockerconfigjson" in (t.template or {}) for t in templates
    )


def test_every_operator_pod_has_its_own_lease_identity():
    """Leases are held by TOKENSYNC_IDENTITY: the Pod name, unique among live Pods, kept across restarts."""
    for objects in (
        build(MANIFESTS),
        build(MANIFESTS / "overlays" / "redis"),
        build(MANIFESTS / "overlays" / "namespaced"),
    ):
        env = {e["name"]: e for e in container(one(objects, "Deployment"))["env"]}
        assert env["TOKENSYNC_IDENTITY"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
