"""The operator's journey on a real cluster (see conftest.py for how to run it).

In order, sharing one namespace and one operator process:

1. the operator runs with exactly the shipped RBAC (and that RBAC is what we think);
2. client_credentials, password (via OIDC discovery) and refresh_token credentials
   become Ready, and their Secrets hold tokens the IdP calls active;
3. with short tokens, for TOKENSYNC_E2E_SOAK_SECONDS, every poll finds an unexpired,
   active token in every Secret, and the tokens are renewed;
3b. a second operator process (a replica during a rolling update, same RBAC) runs
   alongside for two token lifetimes: tokens stay fresh, and no rotating refresh
   token is presented twice (the IdP counts reuse);
4. a bad spec (a referenced key that does not exist) gets Ready=False naming the
   field, and a Warning Event, while the others stay Ready;
5. deleting a credential lets the garbage collector remove its target and state Secrets
   (and never the user's own Secrets);
6. the operator's log has no permission errors, no tracebacks, no secret values.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from tokensync.models.credential import OAuthCredential

POLL_INTERVAL = 5.0

CC = "e2e-client-credentials"
PASSWORD = "e2e-password"
REFRESH = "e2e-refresh-token"
BAD = "e2e-bad-spec"
# Which Secret each credential writes (one with an explicit target.secretName).
TARGETS = {CC: "e2e-cc-token", PASSWORD: PASSWORD, REFRESH: REFRESH}
CLIENTS = {CC: "cc-client", PASSWORD: "pw-client", REFRESH: "pw-client"}

_progress: dict[str, bool] = {}


def _credential(name: str, issuer: dict[str, Any], grant: dict[str, Any], **spec: Any) -> dict[str, Any]:
    body = {
        "apiVersion": "tokensync.dev/v1alpha1",
        "kind": "OAuthCredential",
        "metadata": {"name": name},
        "spec": {"issuer": issuer, "grant": grant, **spec},
    }
    OAuthCredential.model_validate(body)  # what the operator will accept; fail here, not in a wait
    return body


def parse_expiry(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def now() -> datetime:
    return datetime.now(UTC)


def _ref(name: str, key: str) -> dict[str, str]:
    return {"name": name, "key": key}


@pytest.fixture(scope="module")
def credentials(cluster) -> dict[str, str]:
    """The three grants, with the Secrets they reference; name -> target Secret name."""
    idp = cluster.idp
    cluster.apply(
        cluster.secret("e2e-cc-client", {"client-secret": idp.client_secret("cc-client")}),
        cluster.secret(
            "e2e-pw-login",
            {"client-secret": idp.client_secret("pw-client"), "username": "alice", "password": idp.password("alice")},
        ),
        cluster.secret(
            "e2e-refresh-bootstrap",
            {
                "client-secret": idp.client_secret("pw-client"),
                "refresh-token": cluster.bootstrap_refresh_token("pw-client", "alice"),
            },
            labels={"tokensync.dev/role": "source"},
        ),
    )
    cluster.apply(
        _credential(
            CC,
            {"tokenURL": idp.token_url},
            {
                "type": "client_credentials",
                "clientID": "cc-client",
                "clientSecretRef": _ref("e2e-cc-client", "client-secret"),
            },
            target={"secretName": TARGETS[CC]},
        ),
        _credential(
            PASSWORD,
            {"issuerURL": idp.issuer_url},
            {
                "type": "password",
                "clientID": "pw-client",
                "clientSecretRef": _ref("e2e-pw-login", "client-secret"),
                "usernameRef": _ref("e2e-pw-login", "username"),
                "passwordRef": _ref("e2e-pw-login", "password"),
            },
        ),
        _credential(
            REFRESH,
            {"tokenURL": idp.token_url},
            {
                "type": "refresh_token",
                "clientID": "pw-client",
                "clientSecretRef": _ref("e2e-refresh-bootstrap", "client-secret"),
                "refreshTokenRef": _ref("e2e-refresh-bootstrap", "refresh-token"),
            },
        ),
    )
    return dict(TARGETS)


@pytest.fixture
def ready(credentials) -> dict[str, str]:
    if not _progress.get("ready"):
        pytest.skip("the credentials never became Ready (see test_credentials_become_ready)")
    return credentials


def _is_ready(cluster, name: str) -> bool:
    condition = cluster.condition(name)
    return condition is not None and condition.get("status") == "True"


# -- 1 --------------------------------------------------------------------------------------------


def test_operator_runs_with_exactly_the_shipped_rbac(cluster):
    sa, ns = cluster.sa, cluster.namespace
    cred = "oauthcredentials.tokensync.dev"
    crd = "customresourcedefinitions.apiextensions.k8s.io"
    allowed = [
        *((verb, "secrets", ns, None) for verb in ("get", "list", "watch", "create", "update", "delete")),
        ("list", cred, ns, None),
        ("watch", cred, ns, None),
        ("patch", cred, ns, "status"),
        ("create", "events", ns, None),
        ("list", crd, None, None),
        ("watch", crd, None, None),
    ]
    denied = [
        ("get", cred, ns, None),
        ("patch", cred, ns, None),
        ("update", cred, ns, None),
        ("update", cred, ns, "status"),
        ("patch", "secrets", ns, None),
        ("list", "configmaps", ns, None),
        ("list", "pods", ns, None),
        ("list", "namespaces", None, None),
        ("create", crd, None, None),
        ("create", "clusterroles.rbac.authorization.k8s.io", None, None),
    ]
    wrong = [f"{v} {r}{'/' + s if s else ''}: expected allowed" for v, r, n, s in allowed if not sa.can_i(v, r, n, s)]
    wrong += [f"{v} {r}{'/' + s if s else ''}: expected denied" for v, r, n, s in denied if sa.can_i(v, r, n, s)]
    assert not wrong, "the ServiceAccount's permissions differ from manifests/rbac/clusterrole.yaml:\n" + "\n".join(
        wrong
    )
    assert cluster.operator.running
    assert "tokensync started" in cluster.operator.log()


# -- 2 --------------------------------------------------------------------------------------------


def test_credentials_become_ready(cluster, credentials):
    for name in credentials:
        cluster.wait_ready(name)
    for name, target in credentials.items():
        body = cluster.credential(name)
        status = body["status"]
        assert status["secretName"] == target
        assert status["observedGeneration"] == body["metadata"]["generation"]
        assert parse_expiry(status["expiresAt"]) > now()

        secret = cluster.read_secret(target)
        assert secret is not None
        meta = secret["metadata"]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "tokensync"
        assert meta["labels"]["tokensync.dev/role"] == "target"
        assert meta["annotations"]["tokensync.dev/credential"] == name
        assert [(o["kind"], o["uid"]) for o in meta["ownerReferences"]] == [
            ("OAuthCredential", body["metadata"]["uid"])
        ]
        data = cluster.secret_data(target)
        assert set(data) == {"access_token", "token_type", "expires_at"}, "never the refresh token"
        assert parse_expiry(data["expires_at"]) > now()
        info = cluster.idp.introspect(data["access_token"])
        assert info.get("active") is True, f"{name}: the IdP does not call the Secret's token active"
        assert info.get("client_id") in (None, CLIENTS[name])

        state = cluster.read_secret(f"{name}-tokensync-state")
        assert state is not None, f"{name}: no state Secret"
        assert state["metadata"]["labels"]["tokensync.dev/role"] == "state"
        assert [o["uid"] for o in state["metadata"]["ownerReferences"]] == [body["metadata"]["uid"]]
    _progress["ready"] = True


# -- 3 --------------------------------------------------------------------------------------------


def _check_fresh(cluster, name: str, target: str, seen: set[str]) -> str | None:
    """None if the Secret holds an unexpired token the IdP calls active; else what is wrong (no values)."""
    data = cluster.secret_data(target)
    token = data["access_token"]
    if parse_expiry(data["expires_at"]) <= now():
        return f"expires_at {data['expires_at']} is not in the future"
    if not cluster.idp.introspect(token).get("active"):
        # A refresh revokes the previous access token at the IdP: if the operator renewed
        # between our read and the introspection, the Secret already holds the new one.
        again = cluster.secret_data(target)
        if again["access_token"] == token:
            return "the Secret's access token is not active at the IdP"
        token = again["access_token"]
        if not cluster.idp.introspect(token).get("active"):
            return "the Secret's renewed access token is not active at the IdP"
    seen.add(token)
    if not _is_ready(cluster, name):
        return f"Ready is {cluster.condition(name)}"
    return None


def test_tokens_stay_fresh(cluster, ready):
    seen: dict[str, set[str]] = {name: set() for name in ready}
    problems: list[str] = []
    started = time.monotonic()
    polls = 0
    while True:
        for name, target in ready.items():
            problem = _check_fresh(cluster, name, target, seen[name])
            if problem:
                problems.append(f"t+{time.monotonic() - started:.0f}s {name}: {problem}")
        polls += 1
        if time.monotonic() - started >= cluster.soak_seconds:
            break
        time.sleep(POLL_INTERVAL)
    assert not problems, f"{len(problems)} problem(s) in {polls} polls:\n" + "\n".join(problems)
    if cluster.soak_seconds >= 2 * cluster.token_lifetime:
        for name, tokens in seen.items():
            assert len(tokens) >= 2, (
                f"{name}: one token for {cluster.soak_seconds:.0f} s of {cluster.token_lifetime}-second tokens"
            )


def test_a_second_replica_never_spends_a_refresh_token_twice(cluster, ready, tmp_path):
    idp = cluster.idp
    reused = idp.refresh_token_reuse_count("pw-client")
    password_grants = idp.token_request_count("pw-client", "password")
    first = cluster.operator
    # Its own identity, as a second Pod would have, and its own metrics port (Pods do not
    # share ports; two processes on this machine do); the same kubeconfig, so the same RBAC.
    env = {**first.env, "TOKENSYNC_IDENTITY": "e2e-replica-1", "TOKENSYNC_METRICS_PORT": "0"}
    replica = type(first)(first.command, env, tmp_path / "replica.log")
    replica.start()
    problems: list[str] = []
    seen: dict[str, set[str]] = {name: set() for name in ready}
    try:
        replica.wait_for_log("tokensync started", timeout=cluster.wait_seconds)
        started = time.monotonic()
        while time.monotonic() - started < 2 * cluster.token_lifetime + POLL_INTERVAL:
            for name, target in ready.items():
                problem = _check_fresh(cluster, name, target, seen[name])
                if problem:
                    problems.append(f"t+{time.monotonic() - started:.0f}s {name}: {problem}")
            time.sleep(POLL_INTERVAL)
        assert replica.running, "the replica exited:\n" + replica.log_tail()
    finally:
        replica.stop()
    assert not problems, "\n".join(problems)
    assert idp.refresh_token_reuse_count("pw-client") == reused, "a refresh token was presented twice"
    # A revoked token family would have forced the password credential back to its password.
    assert idp.token_request_count("pw-client", "password") == password_grants
    log = replica.log()
    assert "Traceback" not in log, replica.log_tail()
    assert not [line for line in log.splitlines() if PERMISSION_ERROR.search(line)]
    assert not sum(1 for value in cluster.secret_values if value in log)


# -- 4 --------------------------------------------------------------------------------------------


def test_bad_spec_names_the_field_and_others_stay_ready(cluster, ready):
    cluster.apply(cluster.secret("e2e-bad-client", {"not-the-client-secret": "placeholder-value"}))
    cluster.apply(
        _credential(
            BAD,
            {"tokenURL": cluster.idp.token_url},
            {
                "type": "client_credentials",
                "clientID": "cc-client",
                "clientSecretRef": _ref("e2e-bad-client", "client-secret"),
            },
        )
    )

    def reported() -> bool:
        condition = cluster.condition(BAD)
        return condition is not None and condition.get("status") == "False"

    cluster.poll(f"Ready=False on {BAD}", reported)
    condition = cluster.condition(BAD)
    assert condition is not None
    assert "grant.clientSecretRef" in condition["message"], condition
    assert "client-secret" in condition["message"], condition
    assert condition.get("reason"), condition
    assert cluster.read_secret(BAD) is None, "no target Secret for a credential that never got a token"

    def warned() -> bool:
        events = cluster.kubectl.json(
            "get", "events", "-n", cluster.namespace, f"--field-selector=involvedObject.name={BAD}"
        )
        return any(e.get("type") == "Warning" for e in events.get("items") or [])

    cluster.poll(f"a Warning Event on {BAD}", warned)
    not_ready = [name for name in ready if not _is_ready(cluster, name)]
    assert not not_ready, f"a bad neighbour made these not Ready: {not_ready}"


# -- 5 --------------------------------------------------------------------------------------------


def test_deleting_a_credential_collects_its_secrets(cluster, ready):
    target, state = ready[CC], f"{CC}-tokensync-state"
    assert cluster.read_secret(target) is not None and cluster.read_secret(state) is not None
    cluster.kubectl.run(
        "delete",
        "oauthcredential",
        CC,
        "-n",
        cluster.namespace,
        "--wait=true",
        f"--timeout={cluster.wait_seconds:.0f}s",
    )
    # The API server's garbage collector deletes dependents asynchronously.
    cluster.poll(
        f"the garbage collector to delete Secrets {target} and {state}",
        lambda: cluster.read_secret(target) is None and cluster.read_secret(state) is None,
        timeout=cluster.wait_seconds,
    )
    assert cluster.read_secret("e2e-cc-client") is not None, "the user's own Secret is never collected"
    for name in (PASSWORD, REFRESH):
        assert _is_ready(cluster, name)


# -- 6 --------------------------------------------------------------------------------------------

PERMISSION_ERROR = re.compile(r"forbidden|unauthorized|HTTP 40[13]\b", re.IGNORECASE)
# With --namespace (TOKENSYNC_E2E_WATCH=namespace) only: kopf's retried LIST of namespaces,
# which the shipped RBAC does not grant (with -A, kopf never lists namespaces).
NAMESPACES_LIST = re.compile(r"GET \S+/api/v1/namespaces(\?\S*)? -> ")


def test_operator_log_is_clean(cluster):
    assert cluster.operator.running, "the operator exited:\n" + cluster.operator.log_tail()
    log = cluster.operator.log()
    lines = log.splitlines()
    if cluster.watch == "namespace":
        lines = [line for line in lines if not NAMESPACES_LIST.search(line)]
    denied = [line for line in lines if PERMISSION_ERROR.search(line)]
    assert not denied, "the shipped RBAC is not enough:\n" + "\n".join(denied[:20])
    assert "Traceback" not in log
    leaked = sum(1 for value in cluster.secret_values if value in log)
    assert not leaked, f"{leaked} secret value(s) (client secrets, passwords, tokens) appear in the operator log"
