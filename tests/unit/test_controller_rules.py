"""Pure rules of the controller: target Secret shape, ownership, conditions, error reasons."""

import base64
import re
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr, ValidationError

from tokensync.auth import InvalidClientError, InvalidGrantError, RateLimitedError, ReauthenticationRequired
from tokensync.controller.outcomes import InvalidSpecError, SecretConflictError, classify, conditions
from tokensync.controller.reconciler import describe_validation_error, inputs_hash, spec_hash
from tokensync.controller.secrets import desired_target, is_ours, merged_for_replace, secret_differs, state_secret_name
from tokensync.models.credential import OAuthCredential
from tokensync.models.tokens import TokenSet
from tokensync.stores.base import StoreError

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def credential(**spec_overrides):
    spec = {
        "issuer": {"tokenURL": "https://idp.example/token"},
        "grant": {"type": "client_credentials", "clientID": "c", "clientSecretRef": {"name": "s", "key": "k"}},
    }
    spec.update(spec_overrides)
    return OAuthCredential.model_validate(
        {"metadata": {"name": "api", "namespace": "team", "uid": "uid-1", "generation": 1}, "spec": spec}
    )


TOKEN = TokenSet(
    access_token=SecretStr("test-secret-access"),
    refresh_token=SecretStr("test-secret-refresh"),
    scope="read",
    issued_at=NOW,
    expires_at=NOW + timedelta(hours=1),
)


def decoded(secret):
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_default_target_holds_only_what_workloads_need():
    secret = desired_target(credential(), TOKEN)
    assert decoded(secret) == {
        "access_token": "test-secret-access",
        "token_type": "Bearer",
        "expires_at": "2026-01-01T01:00:00Z",
    }
    assert "test-secret-refresh" not in str(secret)
    assert secret["metadata"]["name"] == "api"
    assert secret["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "tokensync"
    assert secret["metadata"]["labels"]["tokensync.dev/role"] == "target"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_template_type_labels_and_retain_policy():
    cred = credential(
        target={
            "secretName": "registry",
            "type": "kubernetes.io/dockerconfigjson",
            "labels": {"team": "a"},
            "annotations": {"note": "x"},
            "deletionPolicy": "Retain",
            "template": {"Authorization": "{{ token_type }} {{ access_token }}"},
        }
    )
    secret = desired_target(cred, TOKEN)
    assert decoded(secret) == {"Authorization": "Bearer test-secret-access"}
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    assert secret["metadata"]["labels"]["team"] == "a"
    assert "ownerReferences" not in secret["metadata"]


def test_ownership_needs_both_marks():
    ours = desired_target(credential(), TOKEN)
    assert is_ours(ours, "api")
    assert not is_ours(ours, "other")
    assert not is_ours({"metadata": {"name": "api"}}, "api")
    forged = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "tokensync"}}}
    assert not is_ours(forged, "api")


def test_differs_ignores_foreign_labels_but_not_data_or_ours():
    desired = desired_target(credential(), TOKEN)
    actual = merged_for_replace(
        {"metadata": {"labels": {"argocd.argoproj.io/instance": "x"}, "resourceVersion": "7"}}, desired
    )
    assert actual["metadata"]["labels"]["argocd.argoproj.io/instance"] == "x"
    assert actual["metadata"]["resourceVersion"] == "7"
    assert not secret_differs(actual, desired)
    tampered = {**actual, "data": {**actual["data"], "access_token": "ZXZpbA=="}}
    assert secret_differs(tampered, desired)


def test_state_secret_names_stay_valid():
    assert state_secret_name("api") == "api-tokensync-state"
    long = state_secret_name("a" * 253)
    assert len(long) <= 253 and long.endswith("-tokensync-state")


def test_fingerprints_follow_spec_and_secret_values():
    a, b = credential(), credential(grant={"type": "client_credentials", "clientID": "other",
                                           "clientSecretRef": {"name": "s", "key": "k"}})  # fmt: skip
    assert spec_hash(a.spec) != spec_hash(b.spec)
    assert spec_hash(a.spec) == spec_hash(credential(target={"secretName": "x"}).spec)  # target is not an input
    fp = spec_hash(a.spec)
    assert inputs_hash(fp, {"grant.clientSecretRef": "one"}) != inputs_hash(fp, {"grant.clientSecretRef": "two"})


def test_validation_errors_name_fields_and_never_quote_values():
    with pytest.raises(ValidationError) as info:
        OAuthCredential.model_validate(
            {
                "metadata": {"name": "x"},
                "spec": {
                    "issuer": {"tokenURL": "test-secret-not-a-url"},
                    "grant": {"type": "magic", "clientID": "c"},
                },
            }
        )
    text = describe_validation_error(info.value)
    assert "spec.issuer.tokenURL" in text
    assert "spec.grant.type" in text
    assert "test-secret" not in text


@pytest.mark.parametrize(
    ("exc", "reason", "permanent"),
    [
        (InvalidClientError("x"), "InvalidClient", True),
        (InvalidGrantError("x"), "InvalidGrant", True),
        (ReauthenticationRequired("x"), "ReauthenticationRequired", True),
        (RateLimitedError("x", retry_after=30), "IssuerUnavailable", False),
        (StoreError("x"), "StoreUnavailable", False),
        (SecretConflictError("x"), "SecretConflict", True),
        (InvalidSpecError("x"), "InvalidSpec", True),
        (KeyError("test-secret"), "InternalError", False),
    ],
)
def test_every_failure_maps_to_one_reason(exc, reason, permanent):
    outcome = classify(exc)
    assert (outcome.reason, outcome.permanent) == (reason, permanent)
    assert "test-secret" not in outcome.message


def test_transition_time_moves_only_when_the_status_changes():
    first = conditions(None, ready=(False, "Progressing", "m"), reconciling=(True, "Progressing", "m"),
                       stalled=None, generation=1, now=NOW)  # fmt: skip
    later = NOW + timedelta(minutes=5)
    same = conditions(first, ready=(False, "IssuerUnavailable", "down"), reconciling=(True, "IssuerUnavailable", "d"),
                      stalled=None, generation=1, now=later)  # fmt: skip
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    flipped = conditions(same, ready=(True, "TokenIssued", "ok"), reconciling=None, stalled=None, generation=1,
                         now=later)  # fmt: skip
    assert flipped[0]["lastTransitionTime"] == "2026-01-01T00:05:00Z"
    assert [c["type"] for c in flipped] == ["Ready"]


def test_bearer_token_is_found_where_each_kubernetes_client_version_keeps_it():
    import kubernetes.client

    from tokensync.controller import bearer_header

    new = kubernetes.client.Configuration()
    new.api_key = {"BearerToken": "test-secret-sa-token"}
    new.api_key_prefix = {"BearerToken": "Bearer"}
    old = kubernetes.client.Configuration()
    old.api_key = {"authorization": "Bearer test-secret-old"}
    assert bearer_header(new) == "Bearer test-secret-sa-token"
    assert bearer_header(old) == "Bearer test-secret-old"
    assert bearer_header(kubernetes.client.Configuration()) is None


async def test_a_discovered_token_endpoint_must_pass_the_url_policy_too():
    import httpx

    from tokensync.controller import Controller, KubeClient
    from tokensync.controller.outcomes import InvalidSpecError
    from tokensync.models.settings import OperatorSettings

    def issuer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"token_endpoint": "https://169.254.169.254/latest/token"})

    settings = OperatorSettings(allowed_url_prefixes=["https://idp.example"])
    http = httpx.AsyncClient(transport=httpx.MockTransport(issuer))
    controller = Controller(kube=KubeClient.for_url("http://127.0.0.1:1"), settings=settings, http=http)
    cred = credential(issuer={"issuerURL": "https://idp.example"})
    with pytest.raises(
        InvalidSpecError, match=re.escape("the discovered token_endpoint https://169.254.169.254/latest/token")
    ):
        await controller._token_url(cred, {})
    await http.aclose()
    await controller.kube.close()


class FlakyApi:
    """Secrets in a dict; the next `fail_puts` PUTs answer 500, as an API server under load does."""

    def __init__(self):
        self.items = {}
        self.version = 0
        self.fail_puts = 0

    def _stamp(self, body):
        self.version += 1
        body = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.version)}}
        self.items[(body["metadata"]["namespace"], body["metadata"]["name"])] = body
        return body

    async def read_secret(self, namespace, name):
        return self.items.get((namespace, name))

    async def list_secrets(self, namespace, *, label_selector):
        return list(self.items.values())

    async def create_secret(self, namespace, body):
        from tokensync.stores.kubernetes import ApiConflictError

        if (namespace, body["metadata"]["name"]) in self.items:
            raise ApiConflictError("exists", status=409, reason="AlreadyExists")
        return self._stamp(body)

    async def replace_secret(self, namespace, name, body):
        from tokensync.stores.kubernetes import ApiConflictError, ApiError

        if self.fail_puts:
            self.fail_puts -= 1
            raise ApiError("PUT: HTTP 500", status=500)
        if body["metadata"].get("resourceVersion") != self.items[(namespace, name)]["metadata"]["resourceVersion"]:
            raise ApiConflictError("stale", status=409, reason="Conflict")
        return self._stamp(body)

    async def delete_secret(self, namespace, name):
        self.items.pop((namespace, name), None)


async def test_a_failed_state_write_does_not_make_the_state_unreachable():
    from tokensync.controller.reconciler import SecretCache
    from tokensync.stores.base import StoreError
    from tokensync.stores.kubernetes import KubernetesSecretStore

    api = FlakyApi()
    cache = SecretCache(api)
    await cache.prime([])
    store = KubernetesSecretStore(cache, namespace="n", name="s", serialize=str, deserialize=bytes.decode)
    await store.save("one")
    api.fail_puts = 1
    with pytest.raises(StoreError):
        await store.save("two")  # the API server failed once...
    assert await store.load() == "one"  # ...the truth is read from the API, not "absent" from the cache
    await store.save("three")
    assert await store.load() == "three"
    assert api.items[("n", "s")]["data"]["state"] == base64.b64encode(b"three").decode()


async def test_a_late_watch_event_does_not_roll_the_cache_back_behind_our_own_write():
    """The event of an older version arriving after our write's answer must not win: the
    state store would then compare-and-swap against a version that is long gone."""
    from tokensync.controller.reconciler import SecretCache

    api = FlakyApi()
    cache = SecretCache(api)
    await cache.prime([])
    first = await cache.create_secret("n", {"metadata": {"name": "s", "namespace": "n"}, "data": {"v": "MQ=="}})
    second = await cache.replace_secret("n", "s", {**first, "data": {"v": "Mg=="}})
    cache.put(first)  # the watch event of the first write, delivered late
    assert (await cache.read_secret("n", "s")) == second
    newer = await api.replace_secret("n", "s", {**second, "data": {"v": "Mw=="}})
    cache.put(newer)  # a genuinely newer version (another writer) still replaces it
    assert (await cache.read_secret("n", "s")) == newer


async def test_a_conflicting_save_keeps_a_renewal_over_the_set_it_was_renewed_from():
    """A conflict (a stale read of our own lease write, say) must not make the renewal adopt
    the older token set it started from: that set's refresh token was just spent."""
    from tokensync.auth import Superseded
    from tokensync.controller.reconciler import FingerprintedStore, SecretCache
    from tokensync.models.state import StoredCredential
    from tokensync.stores.kubernetes import KubernetesSecretStore

    api = FlakyApi()
    cache = SecretCache(api)
    await cache.prime([])
    store = KubernetesSecretStore(
        cache, namespace="n", name="s", serialize=StoredCredential.to_json, deserialize=StoredCredential.from_json
    )
    now = datetime.now(UTC)

    def tokens(tag, issued):
        return TokenSet(access_token=SecretStr(f"test-secret-a-{tag}"), refresh_token=SecretStr(f"test-secret-r-{tag}"),
                        issued_at=issued, expires_at=issued + timedelta(hours=1))  # fmt: skip

    base, renewed, winner = tokens("base", now), tokens("renewed", now + timedelta(seconds=1)), None
    await FingerprintedStore(store, "spec", "inputs").save(base)
    other = KubernetesSecretStore(
        cache, namespace="n", name="s", serialize=StoredCredential.to_json, deserialize=StoredCredential.from_json
    )
    await other.load()
    await FingerprintedStore(store, "spec", "inputs").save(base)  # someone rewrote the same base set
    await FingerprintedStore(other, "spec", "inputs").save(renewed)  # conflict: ours is newer, so it is kept
    stored = await store.load()
    assert stored is not None and stored.token_set.refresh_token.get_secret_value() == "test-secret-r-renewed"
    # A set issued after ours is another process's win, and is adopted.
    winner = tokens("winner", now + timedelta(seconds=2))
    await FingerprintedStore(store, "spec", "inputs").save(winner)
    with pytest.raises(Superseded) as adopted:
        await FingerprintedStore(other, "spec", "inputs").save(tokens("late", now + timedelta(seconds=1)))
    assert adopted.value.token_set.refresh_token.get_secret_value() == "test-secret-r-winner"


def test_foreign_owner_references_do_not_cause_rewrites():
    desired = desired_target(credential(), TOKEN)
    actual = merged_for_replace({"metadata": {"ownerReferences": [{"kind": "Application", "uid": "argo"}]}}, desired)
    assert [o["kind"] for o in actual["metadata"]["ownerReferences"]] == ["Application", "OAuthCredential"]
    assert not secret_differs(actual, desired)


def test_the_state_secret_is_not_a_target_even_with_our_marks():
    state = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "tokensync", "tokensync.dev/role": "state"},
                          "annotations": {"tokensync.dev/credential": "api"}}}  # fmt: skip
    assert not is_ours(state, "api")


def test_after_a_spec_change_failures_never_report_the_old_token_as_ready():
    from tokensync.controller import Controller, KubeClient
    from tokensync.controller.reconciler import Entry
    from tokensync.models.settings import OperatorSettings

    controller = Controller(kube=KubeClient.for_url("http://127.0.0.1:1"), settings=OperatorSettings())
    entry = Entry(key=("team", "api"), attempt_generation=2)
    entry.status = {
        "observedGeneration": 1,
        "expiresAt": "2999-01-01T00:00:00Z",
        "conditions": [{"type": "Ready", "status": "True", "reason": "TokenIssued", "observedGeneration": 1,
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }  # fmt: skip
    outage = RateLimitedError("token endpoint answered HTTP 429")
    first = controller._failure_status(entry, outage, NOW)
    assert first["conditions"][0]["status"] == "False"
    entry.status = first
    second = controller._failure_status(entry, outage, NOW)
    assert second["conditions"][0]["status"] == "False"  # was True: Ready for generation 2 with a gen-1 token


def test_a_restart_in_a_failure_streak_waits_for_the_planned_retry_even_as_secrets_are_listed():
    """Listing Secrets at start-up says what exists, not what changed: no early retry."""
    from tokensync.controller import Controller, KubeClient
    from tokensync.models.settings import OperatorSettings

    controller = Controller(
        kube=KubeClient.for_url("http://127.0.0.1:1"), settings=OperatorSettings(), clock=lambda: NOW
    )
    spec = credential().model_dump(by_alias=True, mode="json")["spec"]
    spec["grant"]["clientSecretRef"]["name"] = "client"
    planned = NOW + timedelta(seconds=60)  # a 429 said Retry-After: 60 before the restart
    status = {
        "observedGeneration": 1,
        "failedAttempts": 1,
        "lastFailureTime": "2026-01-01T00:00:00Z",
        "nextRefreshTime": "2026-01-01T00:01:00Z",
    }
    meta = {"name": "api", "namespace": "team", "uid": "uid-1", "generation": 1}
    controller.observe({"metadata": meta, "spec": spec, "status": status}, None)
    key = ("team", "api")
    assert controller.scheduler.due_time(key) == planned.timestamp() + 1

    def secret(name, role, version, annotations=None):
        return {"metadata": {"name": name, "namespace": "team", "resourceVersion": version,
                             "labels": {"tokensync.dev/role": role}, "annotations": annotations or {}}}  # fmt: skip

    target = secret("api", "target", "7", {"tokensync.dev/credential": "api"})
    source = secret("client", "source", "3")
    controller.observe_secret(target, None)
    controller.observe_secret(source, None)
    assert controller.scheduler.due_time(key) == planned.timestamp() + 1
    # The same listing again (a watch reconnecting) is still nothing new ...
    controller.observe_secret(source, None)
    assert controller.scheduler.due_time(key) == planned.timestamp() + 1
    # ... but a client secret changed while unwatched is, and so is an edit of the target.
    controller.observe_secret(secret("client", "source", "4"), None)
    assert controller.scheduler.due_time(key) == NOW.timestamp()
    controller.scheduler.schedule(key, planned.timestamp())
    controller.observe_secret({**target, "metadata": {**target["metadata"], "resourceVersion": "8"}}, "MODIFIED")
    assert controller.scheduler.due_time(key) == NOW.timestamp()
