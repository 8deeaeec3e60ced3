"""The real operator (kopf, tokensync's handlers and controller) against the API emulator
and the real OAuth2 server: what a user sees with kubectl."""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from support.operator import Cluster, running_operator, wait_until
from tokensync.models.settings import OperatorSettings


def cc_spec(idp, secret="cc", **extra):
    spec = {
        "issuer": {"tokenURL": idp.token_url},
        "grant": {
            "type": "client_credentials",
            "clientID": "cc-client",
            "clientSecretRef": {"name": secret, "key": "secret"},
        },
    }
    spec.update(extra)
    return spec


@pytest.fixture
def cluster(kube, kube_api):
    cluster = Cluster(kube_api)
    yield cluster
    problems = cluster.leak_report()
    assert not problems, problems


def test_every_grant_and_client_authentication_method_lands_a_working_token(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    cluster.apply_secret("pw", {"secret": idp.client_secret("pw-client")})
    cluster.apply_secret("alice", {"username": "alice", "password": idp.password("alice")})
    cluster.apply_secret(
        "bob",
        {"username": "bob", "password": idp.password("bob"), "totp": idp.users["bob"].totp_seed.get_secret_value()},
    )
    cluster.apply_secret("keys", {"rs": idp.jwt_rs_private_key_pem, "es": idp.jwt_es_private_key_pem})
    # A bootstrap refresh token, obtained the way a human would (a one-off login).
    bootstrap = httpx.post(
        idp.token_url,
        data={"grant_type": "password", "username": "alice", "password": idp.password("alice")},
        auth=("pw-client", idp.client_secret("pw-client")),
    ).json()["refresh_token"]
    cluster.apply_secret("bootstrap", {"token": bootstrap})

    issuer = {"tokenURL": idp.token_url}
    specs = {
        "cc-basic": cc_spec(idp),
        "cc-post": cc_spec(idp, grant={"type": "client_credentials", "clientID": "cc-client", "clientAuthMethod": "client_secret_post",
                                       "clientSecretRef": {"name": "cc", "key": "secret"}}),
        "cc-jwt-rs": {"issuer": issuer, "grant": {"type": "client_credentials", "clientID": "jwt-rs-client",
                                                  "privateKeyRef": {"name": "keys", "key": "rs"}}},
        "cc-jwt-es": {"issuer": issuer, "grant": {"type": "client_credentials", "clientID": "jwt-es-client",
                                                  "privateKeyRef": {"name": "keys", "key": "es"}, "signingAlgorithm": "ES256"}},
        "pw-public": {"issuer": {"issuerURL": idp.issuer_url},
                      "grant": {"type": "password", "clientID": "public-client", "clientAuthMethod": "none",
                                "usernameRef": {"name": "alice", "key": "username"},
                                "passwordRef": {"name": "alice", "key": "password"}}},
        "pw-totp": {"issuer": issuer, "grant": {"type": "password", "clientID": "pw-client",
                                                "clientSecretRef": {"name": "pw", "key": "secret"},
                                                "usernameRef": {"name": "bob", "key": "username"},
                                                "passwordRef": {"name": "bob", "key": "password"},
                                                "totpSecretRef": {"name": "bob", "key": "totp"}}},
        "rt": {"issuer": issuer, "grant": {"type": "refresh_token", "clientID": "pw-client",
                                           "clientSecretRef": {"name": "pw", "key": "secret"},
                                           "refreshTokenRef": {"name": "bootstrap", "key": "token"}}},
    }  # fmt: skip
    with running_operator(kube.url):
        for name, spec in specs.items():
            cluster.apply_credential(name, spec)
        for name in specs:
            wait_until(lambda name=name: cluster.ready(name), what=f"{name} Ready: {cluster.condition(name)}")
            data = cluster.secret_data(name)
            assert data is not None and set(data) == {"access_token", "token_type", "expires_at"}
            assert idp.introspect(data["access_token"])["active"] is True, name
    # The refresh token stays in the store: never in the Secret pods mount.
    state = cluster.secret("rt-tokensync-state")
    assert state is not None and state["metadata"]["labels"]["tokensync.dev/role"] == "state"
    assert "refresh_token" not in str(cluster.secret_data("rt"))


def test_short_lived_tokens_are_renewed_before_they_expire(cluster, kube, make_idp):
    idp = make_idp(access_token_lifetime=6)
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    idp.reset_counters()
    with running_operator(kube.url):
        cluster.apply_credential("api", cc_spec(idp))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        seen: set[str] = set()
        deadline = time.time() + 14
        while time.time() < deadline:
            data = cluster.secret_data("api")
            assert data is not None
            seen.add(data["access_token"])
            # expires_at is written rounded *down* to the second (a consumer may
            # retire a token early, never late): the real expiry is up to 1 s later.
            expires = time.mktime(time.strptime(data["expires_at"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone + 1
            assert expires > time.time(), "the Secret held an expired token"
            time.sleep(0.2)
    # Read once the operator has stopped (it finishes renewals in flight first): a status
    # read while it runs can miss the renewal that is just being written.
    status = cluster.credential("api")["status"]
    assert len(seen) >= 3
    # One token request per renewal, no more.
    assert idp.token_request_count("cc-client") == status["refreshCount"]


def test_restart_with_valid_tokens_makes_no_request_and_no_write(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    with running_operator(kube.url):
        cluster.apply_credential("api", cc_spec(idp))
        wait_until(lambda: cluster.ready("api"), what="Ready")
    secret_version = cluster.secret("api")["metadata"]["resourceVersion"]
    state_version = cluster.secret("api-tokensync-state")["metadata"]["resourceVersion"]
    cr_version = cluster.credential("api")["metadata"]["resourceVersion"]
    idp.reset_counters()
    with running_operator(kube.url) as operator:
        wait_until(lambda: ("default", "api") in operator.controller.entries, what="credential seen")
        operator.call(operator.controller.scheduler.wait_idle())
        writes = {k: v for k, v in operator.controller.kube.requests.items() if k[0] != "GET"}
    assert idp.token_request_count() == 0
    assert writes == {}
    assert cluster.secret("api")["metadata"]["resourceVersion"] == secret_version
    assert cluster.secret("api-tokensync-state")["metadata"]["resourceVersion"] == state_version
    assert cluster.credential("api")["metadata"]["resourceVersion"] == cr_version


def test_spec_change_and_manual_refresh_get_new_tokens(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    with running_operator(kube.url):
        cluster.apply_credential("api", cc_spec(idp))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        first = cluster.secret_data("api")["access_token"]
        cluster.apply_credential("api", cc_spec(idp, grant={
            "type": "client_credentials", "clientID": "cc-client", "scopes": ["read"],
            "clientSecretRef": {"name": "cc", "key": "secret"}}))  # fmt: skip
        wait_until(lambda: cluster.credential("api")["status"].get("observedGeneration") == 2, what="gen 2")
        second = cluster.secret_data("api")["access_token"]
        assert second != first
        assert idp.introspect(second)["scope"] == "read"
        cluster.apply_credential("api", cluster.credential("api")["spec"], annotations={
            "tokensync.dev/refresh-requested-at": "2026-01-01T00:00:00Z"})  # fmt: skip
        wait_until(lambda: cluster.secret_data("api")["access_token"] != second, what="manual refresh")
        status = cluster.credential("api")["status"]
        assert status["handledRefreshRequest"] == "2026-01-01T00:00:00Z"


def test_changed_source_secret_gets_a_new_grant(cluster, kube, make_idp):
    idp = make_idp(fresh=True)
    cluster.apply_secret("alice", {"username": "alice", "password": idp.password("alice")},
                         labels={"tokensync.dev/role": "source"})  # fmt: skip
    cluster.apply_secret("pw", {"secret": idp.client_secret("pw-client")})
    spec = {"issuer": {"tokenURL": idp.token_url},
            "grant": {"type": "password", "clientID": "pw-client", "clientSecretRef": {"name": "pw", "key": "secret"},
                      "usernameRef": {"name": "alice", "key": "username"},
                      "passwordRef": {"name": "alice", "key": "password"}}}  # fmt: skip
    with running_operator(kube.url):
        cluster.apply_credential("api", spec)
        wait_until(lambda: cluster.ready("api"), what="Ready")
        idp.set_password("alice", "new-secret-password-1")
        idp.reset_counters()
        cluster.apply_secret("alice", {"username": "alice", "password": "new-secret-password-1"},
                             labels={"tokensync.dev/role": "source"})  # fmt: skip
        wait_until(lambda: idp.token_request_count("pw-client", "password") >= 1, what="a new password grant")
        wait_until(lambda: cluster.ready("api"), what="still Ready")
        assert idp.introspect(cluster.secret_data("api")["access_token"])["active"] is True


def test_deleted_or_edited_target_secret_is_repaired(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    with running_operator(kube.url):
        cluster.apply_credential("api", cc_spec(idp))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        token = cluster.secret_data("api")["access_token"]
        cluster.core.delete_namespaced_secret("api", "default")
        wait_until(lambda: cluster.secret_data("api"), what="recreated")
        assert cluster.secret_data("api")["access_token"] == token  # repaired, not re-granted
        body = cluster.secret("api")
        body["data"]["access_token"] = "dGFtcGVyZWQ="
        cluster.core.replace_namespaced_secret("api", "default", body)
        wait_until(lambda: cluster.secret_data("api")["access_token"] == token, what="edit reverted")


def test_a_foreign_secret_is_never_overwritten(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    cluster.apply_secret("taken", {"mine": "do-not-touch"})
    with running_operator(kube.url):
        cluster.apply_credential("api", cc_spec(idp, target={"secretName": "taken"}))
        wait_until(lambda: (cluster.condition("api") or {}).get("reason") == "SecretConflict", what="conflict")
        assert "Secret taken" in cluster.condition("api")["message"]
        assert cluster.condition("api", "Stalled")["status"] == "True"
    assert cluster.secret_data("taken") == {"mine": "do-not-touch"}


def test_bad_specs_say_which_field_and_others_keep_working(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    bad = {
        "wrong-type": cc_spec(idp, grant={"type": "magic", "clientID": "c"}),
        "missing-secret": cc_spec(idp, secret="nope"),
        "missing-key": cc_spec(idp, grant={"type": "client_credentials", "clientID": "cc-client",
                                           "clientSecretRef": {"name": "cc", "key": "nokey"}}),
        "wrong-secret": cc_spec(idp, secret="wrong"),
        "plain-http": {**cc_spec(idp), "issuer": {"tokenURL": "http://idp.example.com/token"}},
        "collide": cc_spec(idp, target={"secretName": "collide-tokensync-state"}),
    }  # fmt: skip
    cluster.apply_secret("wrong", {"secret": "not-the-secret"})
    expected = {
        "wrong-type": ("InvalidSpec", "spec.grant.type"),
        "missing-secret": ("SecretNotFound", "grant.clientSecretRef: Secret nope not found"),
        "missing-key": ("SecretNotFound", "Secret cc has no key nokey"),
        "wrong-secret": ("InvalidClient", "invalid_client"),
        "plain-http": ("InvalidSpec", "issuer.tokenURL uses plain http"),
        "collide": ("InvalidSpec", "target.secretName collide-tokensync-state is reserved"),
    }
    with running_operator(kube.url):
        for name, spec in bad.items():
            cluster.apply_credential(name, spec)
        cluster.apply_credential("good", cc_spec(idp))
        wait_until(lambda: cluster.ready("good"), what="good Ready")
        for name, (reason, text) in expected.items():
            condition = wait_until(
                lambda name=name: (c := cluster.condition(name)) and c["reason"] != "Progressing" and c,
                what=f"{name} condition",
            )
            assert condition["status"] == "False", name
            assert condition["reason"] == reason, (name, condition)
            assert text in condition["message"], (name, condition)
            assert "not-the-secret" not in str(cluster.credential(name))


def test_redis_backend_keeps_the_token_set_in_redis(cluster, kube, idp, redis_url):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    settings = OperatorSettings(redis_url=redis_url, backoff_initial=0.5, metrics_port=0)
    with running_operator(kube.url, settings=settings):
        cluster.apply_credential("api", cc_spec(idp, store={"backend": "redis"}))
        wait_until(lambda: cluster.ready("api"), what="Ready")
    client = redis.Redis.from_url(redis_url)
    assert client.exists("tokensync:default/api") == 1
    assert 0 < client.ttl("tokensync:default/api") <= 3600
    assert cluster.secret("api-tokensync-state") is None
    with running_operator(kube.url, settings=settings) as operator:
        wait_until(lambda: ("default", "api") in operator.controller.entries, what="credential seen")
        cluster.delete_credential("api")
        wait_until(lambda: client.exists("tokensync:default/api") == 0, what="key removed")


def test_deletion_follows_the_deletion_policy(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    with running_operator(kube.url):
        cluster.apply_credential("gone", cc_spec(idp))
        cluster.apply_credential("kept", cc_spec(idp, target={"deletionPolicy": "Retain"}))
        wait_until(lambda: cluster.ready("gone") and cluster.ready("kept"), what="Ready")
        cluster.delete_credential("gone")
        cluster.delete_credential("kept")
        wait_until(lambda: cluster.secret("gone") is None, what="target collected")
        wait_until(lambda: cluster.secret("gone-tokensync-state") is None, what="state collected")
        wait_until(lambda: cluster.secret("kept-tokensync-state") is None, what="state collected")
    assert cluster.secret_data("kept") is not None


def test_metrics_show_every_credentials_expiry_and_renewal_outcomes(cluster, kube, idp):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    cluster.apply_secret("wrong", {"secret": "not-the-secret"})
    settings = OperatorSettings(metrics_port=port, metrics_address="127.0.0.1", backoff_initial=0.5)
    with running_operator(kube.url, settings=settings):
        cluster.apply_credential("api", cc_spec(idp))
        cluster.apply_credential("broken", cc_spec(idp, secret="wrong"))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        wait_until(lambda: (cluster.condition("broken") or {}).get("reason") == "InvalidClient", what="broken")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    expires = cluster.credential("api")["status"]["expiresAt"]
    expected = time.mktime(time.strptime(expires, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    line = next(
        row for row in text.splitlines() if row.startswith('tokensync_credential_expiry_timestamp_seconds{name="api"')
    )
    assert abs(float(line.rsplit(" ", 1)[1]) - expected) < 1
    assert 'tokensync_credential_ready{name="api",namespace="default"} 1.0' in text
    assert 'tokensync_credential_ready{name="broken",namespace="default"} 0.0' in text
    assert 'tokensync_refresh_total{error="",outcome="success",reason=""}' in text
    assert 'tokensync_refresh_total{error="invalid_client",outcome="failure",reason="InvalidClient"}' in text
    assert 'tokensync_token_endpoint_request_duration_seconds_count{status="2xx"}' in text
    assert 'tokensync_store_operations_total{backend="secret",operation="save",outcome="ok"}' in text
    assert "not-the-secret" not in text and idp.client_secret("cc-client") not in text


def test_a_manual_refresh_that_fails_transiently_is_retried_until_it_renews(cluster, kube, make_idp):
    idp = make_idp(fresh=True)
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    with running_operator(kube.url):
        cluster.apply_credential("api", cc_spec(idp))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        first = cluster.secret_data("api")["access_token"]
        idp.stop()  # the identity provider goes down
        spec = cluster.credential("api")["spec"]
        cluster.apply_credential("api", spec, annotations={"tokensync.dev/refresh-requested-at": "r1"})
        wait_until(lambda: (cluster.condition("api", "Reconciling") or {}).get("reason") == "IssuerUnavailable",
                   what="retrying")  # fmt: skip
        status = cluster.credential("api")["status"]
        assert status.get("handledRefreshRequest") != "r1"
        assert cluster.ready("api")  # the old token is still valid and still served
        idp.start()
        wait_until(lambda: cluster.credential("api")["status"].get("handledRefreshRequest") == "r1",
                   timeout=30, what="request handled after recovery")  # fmt: skip
        assert cluster.secret_data("api")["access_token"] != first


def test_url_policy_refuses_token_urls_outside_the_allowed_prefixes(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    settings = OperatorSettings(allowed_url_prefixes=[idp.url + "/o/"], metrics_port=0)
    internal = idp.token_url.replace("127.0.0.1", "127.0.0.2")  # an address nobody allowed
    with running_operator(kube.url, settings=settings):
        cluster.apply_credential("ok", cc_spec(idp))
        cluster.apply_credential("ssrf", {**cc_spec(idp), "issuer": {"tokenURL": internal}})
        wait_until(lambda: cluster.ready("ok"), what="allowed URL Ready")
        condition = wait_until(lambda: (c := cluster.condition("ssrf")) and c["reason"] == "InvalidSpec" and c,
                               what="refused")  # fmt: skip
    assert f"issuer.tokenURL {internal} is not allowed by the operator's URL policy" in condition["message"]


def test_encrypted_redis_store_holds_no_readable_token_and_needs_the_key(cluster, kube, make_idp, redis_url):
    import base64
    import os

    idp = make_idp(fresh=True)
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    key = base64.b64encode(os.urandom(32)).decode()
    settings = OperatorSettings(redis_url=redis_url, redis_encryption_key=key, metrics_port=0, backoff_initial=0.5)
    with running_operator(kube.url, settings=settings):
        cluster.apply_credential("api", cc_spec(idp, store={"backend": "redis"}))
        wait_until(lambda: cluster.ready("api"), what="Ready")
    token = cluster.secret_data("api")["access_token"]
    raw = redis.Redis.from_url(redis_url).get("tokensync:default/api")
    assert raw.startswith(b"tsenc1:")
    assert token.encode() not in raw and b"access_token" not in raw
    idp.reset_counters()
    with running_operator(kube.url, settings=settings) as operator:  # same key: the stored set is used
        wait_until(lambda: ("default", "api") in operator.controller.entries, what="seen")
        operator.call(operator.controller.scheduler.wait_idle())
    assert idp.token_request_count() == 0
    other = settings.model_copy(update={"redis_encryption_key": OperatorSettings(
        redis_encryption_key=base64.b64encode(os.urandom(32)).decode()).redis_encryption_key})  # fmt: skip
    with running_operator(kube.url, settings=other) as operator:  # wrong key: unreadable, so a new grant
        wait_until(lambda: idp.token_request_count() == 1, what="re-grant")
        wait_until(lambda: cluster.secret_data("api")["access_token"] != token, what="new token published")


def test_a_burst_of_new_credentials_is_spread_at_the_endpoints_rate(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    settings = OperatorSettings(endpoint_rate=4, endpoint_burst=2, metrics_port=0)
    names = [f"c{i}" for i in range(8)]
    with running_operator(kube.url, settings=settings) as operator:
        started = time.monotonic()
        for name in names:
            cluster.apply_credential(name, cc_spec(idp))
        wait_until(lambda: all(cluster.ready(n) for n in names), timeout=30, what="all Ready")
        elapsed = time.monotonic() - started
        waited = operator.controller.limiter.waited
    # 8 requests, 2 at once, then 4/s: at least 1.5 s, however fast the machine is.
    assert elapsed >= 1.4
    assert waited > 0


def test_refresh_token_chain_survives_spec_and_client_secret_changes(cluster, kube, make_idp):
    idp = make_idp(fresh=True)
    secret = idp.client_secret("pw-client")
    bootstrap = httpx.post(
        idp.token_url,
        data={"grant_type": "password", "username": "alice", "password": idp.password("alice")},
        auth=("pw-client", secret),
    ).json()["refresh_token"]
    cluster.apply_secret("boot", {"token": bootstrap})
    cluster.apply_secret("pw", {"secret": secret}, labels={"tokensync.dev/role": "source"})
    spec = {"issuer": {"tokenURL": idp.token_url},
            "grant": {"type": "refresh_token", "clientID": "pw-client", "clientSecretRef": {"name": "pw", "key": "secret"},
                      "refreshTokenRef": {"name": "boot", "key": "token"}}}  # fmt: skip
    with running_operator(kube.url):
        cluster.apply_credential("rt", spec)
        wait_until(lambda: cluster.ready("rt"), what="Ready")
        first = cluster.secret_data("rt")["access_token"]
        # A spec change (here the timeout) must not start over from the spent bootstrap token.
        cluster.apply_credential("rt", {**spec, "issuer": {**spec["issuer"], "timeout": "20s"}})
        wait_until(lambda: cluster.credential("rt")["status"].get("observedGeneration") == 2, what="gen 2")
        assert cluster.ready("rt"), cluster.condition("rt")
        second = cluster.secret_data("rt")["access_token"]
        assert second != first and idp.introspect(second)["active"]
        # Nor must a rotated client secret.
        idp.rotate_client_secret("pw-client", "pw-secret-rotated-1")
        cluster.apply_secret("pw", {"secret": "pw-secret-rotated-1"}, labels={"tokensync.dev/role": "source"})
        wait_until(lambda: cluster.secret_data("rt")["access_token"] != second, what="renewed with the new secret")
        assert cluster.ready("rt"), cluster.condition("rt")
        assert idp.introspect(cluster.secret_data("rt")["access_token"])["active"]


def test_a_conflict_clears_by_itself_once_the_foreign_secret_is_gone(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    cluster.apply_secret("taken", {"mine": "x"})
    settings = OperatorSettings(backoff_initial=0.2, backoff_max=1, metrics_port=0)
    with running_operator(kube.url, settings=settings):
        cluster.apply_credential("api", cc_spec(idp, target={"secretName": "taken"}))
        wait_until(lambda: (cluster.condition("api") or {}).get("reason") == "SecretConflict", what="conflict")
        cluster.core.delete_namespaced_secret("taken", "default")  # the owner gives the name up
        wait_until(lambda: cluster.ready("api"), what="Ready once the name is free")
    assert "access_token" in cluster.secret_data("taken")


def test_switching_the_store_backend_moves_the_tokens_without_a_new_grant(cluster, kube, make_idp, redis_url):
    idp = make_idp(fresh=True)
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    settings = OperatorSettings(redis_url=redis_url, metrics_port=0)
    with running_operator(kube.url, settings=settings):
        cluster.apply_credential("api", cc_spec(idp))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        token = cluster.secret_data("api")["access_token"]
        idp.reset_counters()
        cluster.apply_credential("api", cc_spec(idp, store={"backend": "redis"}))
        wait_until(lambda: cluster.secret("api-tokensync-state") is None, what="state moved out of the Secret")
        wait_until(lambda: redis.Redis.from_url(redis_url).exists("tokensync:default/api"), what="state in Redis")
    assert idp.token_request_count() == 0
    assert cluster.secret_data("api")["access_token"] == token


def test_a_recreated_credential_is_a_new_object(cluster, kube, idp):
    cluster.apply_secret("cc", {"secret": idp.client_secret("cc-client")})
    with running_operator(kube.url):
        cluster.apply_credential("api", cc_spec(idp))
        wait_until(lambda: cluster.ready("api"), what="Ready")
        cluster.delete_credential("api")
        wait_until(lambda: cluster.secret("api") is None, what="collected")
        cluster.apply_credential("api", cc_spec(idp))
        wait_until(lambda: cluster.ready("api") and cluster.secret("api"), what="Ready again")
        uid = cluster.credential("api")["metadata"]["uid"]
        assert cluster.secret("api")["metadata"]["ownerReferences"][0]["uid"] == uid
        assert cluster.secret("api-tokensync-state")["metadata"]["ownerReferences"][0]["uid"] == uid
