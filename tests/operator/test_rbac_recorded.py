"""The shipped ClusterRole is exactly what a recorded operator run needs.

Every request the operator makes (kopf's, and tokensync's own client's, told apart
from the test's by User-Agent) is recorded on the API emulator during a journey
that takes every code path that calls the API: issue, repair, manual refresh,
Secret type and name changes, failures with Events, deletion. Each request maps
to an RBAC (apiGroup, resource, verb); the ClusterRole in manifests/ must grant
all of them (the operator works under it) and nothing else (least privilege).
"""

from __future__ import annotations

from pathlib import Path

import aiohttp.web
import attrs
import kubernetes.client
import pytest
import yaml

from support.kube import PROJECT_CRDS
from support.operator import Cluster, running_operator, wait_until
from support.rbac import rule_of
from tokensync.devkit.kube import ClusterEmulator, cluster_in_thread, read_crds

CLUSTERROLE = Path(__file__).resolve().parents[2] / "manifests" / "rbac" / "clusterrole.yaml"


@attrs.define(kw_only=True)
class RecordingEmulator(ClusterEmulator):
    recorded: list[tuple[str, str, str]] = attrs.field(factory=list)

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        agent = raw_request.headers.get("User-Agent", "")
        if agent.startswith(("kopf/", "tokensync/")):
            self.recorded.append((agent.split("/")[0], raw_request.method, str(raw_request.rel_url)))
        return await super().__call__(raw_request)


def granted() -> set[tuple[str, str, str]]:
    role = yaml.safe_load(CLUSTERROLE.read_text())
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_cluster_role_grants_exactly_what_the_operator_uses(idp):
    emulator = RecordingEmulator()
    with (
        cluster_in_thread(crds=read_crds(PROJECT_CRDS), emulator=emulator) as kube,
        kubernetes.client.ApiClient(kube.kube_configuration()) as api,
    ):
        cluster = Cluster(api)
        cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
        spec = {
            "issuer": {"tokenURL": idp.token_url},
            "grant": {"type": "client_credentials", "clientID": "cc-client",
                      "clientSecretRef": {"name": "cc", "key": "secret"}},
        }  # fmt: skip
        with running_operator(kube.url):
            cluster.apply_credential("api", spec)  # issue: create Secrets, patch status, Event
            wait_until(lambda: cluster.ready("api"), what="Ready")
            cluster.core.delete_namespaced_secret("api", "default")  # repair: create again
            wait_until(lambda: cluster.secret("api"), what="repaired")
            cluster.apply_credential("api", spec, annotations={"tokensync.dev/refresh-requested-at": "1"})
            wait_until(lambda: cluster.credential("api")["status"].get("handledRefreshRequest") == "1",
                       what="refreshed")  # update the Secrets  # fmt: skip
            cluster.apply_credential("api", {**spec, "target": {"type": "example.com/token"}})  # delete+create
            wait_until(lambda: (cluster.secret("api") or {}).get("type") == "example.com/token", what="type")
            cluster.apply_credential("api", {**spec, "target": {"secretName": "renamed"}})  # delete the old
            wait_until(lambda: cluster.secret("renamed") and cluster.secret("api") is None, what="renamed")
            cluster.apply_credential("bad", {**spec, "grant": {**spec["grant"], "clientID": "nobody"}})
            wait_until(lambda: (cluster.condition("bad") or {}).get("reason") == "InvalidClient", what="bad")
            cluster.delete_credential("api")
    used = {rbac for _, method, url in emulator.recorded if (rbac := rule_of(method, url)) is not None}
    assert {agent for agent, _, _ in emulator.recorded} == {"kopf", "tokensync"}
    missing = used - granted()
    unused = granted() - used
    assert not missing, f"the operator needs permissions the ClusterRole lacks: {sorted(missing)}"
    assert not unused, f"the ClusterRole grants permissions the operator never used: {sorted(unused)}"


@pytest.mark.parametrize(
    ("method", "url", "expected"),
    [
        ("GET", "/api/v1/namespaces/ns/secrets/x", ("", "secrets", "get")),
        ("GET", "/api/v1/secrets?labelSelector=a&watch=true", ("", "secrets", "watch")),
        (
            "PATCH",
            "/apis/tokensync.dev/v1alpha1/namespaces/n/oauthcredentials/a/status",
            ("tokensync.dev", "oauthcredentials/status", "patch"),
        ),
        (
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ),
        ("GET", "/apis/tokensync.dev/v1alpha1", None),
        ("POST", "/api/v1/namespaces/n/events", ("", "events", "create")),
    ],
)
def test_requests_map_to_rbac_rules(method, url, expected):
    assert rule_of(method, url) == expected
