"""
The test identity provider, over real HTTP: what tokensync's other tests may rely on.

These pin DOT's actual behaviour (rotation, reuse protection, introspection) and our
extensions (private_key_jwt, TOTP, auth-method and grant policy, admin endpoints), so a
DOT upgrade that changes them fails here, not as a puzzling failure elsewhere.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import httpx
import pyotp
import pytest

from support.idp import BOB_TOTP_SEED, JWT_BEARER_ASSERTION_TYPE, IdpProcess, client_assertion
from tokensync.devkit.idp import ClientConfig, IdpConfig


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=10) as client:
        yield client


def _token(http: httpx.Client, idp: IdpProcess, data: dict[str, str], auth: tuple[str, str] | None = None):
    return http.post(idp.token_url, data=data, auth=auth)


def _password_login(http, idp, username="alice", client_id="public-client"):
    response = _token(
        http,
        idp,
        {"grant_type": "password", "client_id": client_id, "username": username, "password": idp.password(username)},
    )
    assert response.status_code == 200, response.text
    return response.json()


def _refresh(http, idp, refresh_token, client_id="public-client"):
    return _token(http, idp, {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": refresh_token})


def _assertion_form(assertion: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER_ASSERTION_TYPE,
        "client_assertion": assertion,
    }


# -- discovery --------------------------------------------------------------------------


def test_discovery_document_advertises_the_token_endpoint(http, idp):
    document = http.get(idp.issuer_url + "/.well-known/openid-configuration").json()

    assert document["issuer"] == idp.issuer_url
    assert document["token_endpoint"] == idp.token_url
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt", "none"} <= set(
        document["token_endpoint_auth_methods_supported"]
    )


# -- client credentials -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["basic", "post"])
def test_client_credentials(http, idp, method):
    secret = idp.client_secret("cc-client")
    if method == "basic":
        response = _token(http, idp, {"grant_type": "client_credentials"}, auth=("cc-client", secret))
    else:
        response = _token(
            http, idp, {"grant_type": "client_credentials", "client_id": "cc-client", "client_secret": secret}
        )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    # oauthlib never issues a refresh token for client_credentials (RFC 6749 §4.4.3).
    assert "refresh_token" not in body


@pytest.mark.parametrize("method", ["basic", "post"])
def test_wrong_client_secret_is_invalid_client(http, idp, method):
    if method == "basic":
        response = _token(http, idp, {"grant_type": "client_credentials"}, auth=("cc-client", "wrong-secret"))
    else:
        response = _token(
            http, idp, {"grant_type": "client_credentials", "client_id": "cc-client", "client_secret": "wrong-secret"}
        )

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


def test_a_grant_type_the_client_is_not_registered_for_is_refused(http, idp):
    response = _token(
        http, idp, {"grant_type": "client_credentials"}, auth=("pw-client", idp.client_secret("pw-client"))
    )

    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"


# -- password grant ---------------------------------------------------------------------


def test_password_grant_for_a_public_client(http, idp):
    body = _password_login(http, idp)

    assert body["expires_in"] == 3600
    assert body["refresh_token"]


def test_password_grant_for_a_confidential_client(http, idp):
    response = _token(
        http,
        idp,
        {"grant_type": "password", "username": "alice", "password": idp.password("alice")},
        auth=("pw-client", idp.client_secret("pw-client")),
    )

    assert response.status_code == 200, response.text
    assert response.json()["refresh_token"]


def test_wrong_password_is_invalid_grant(http, idp):
    response = _token(
        http,
        idp,
        {"grant_type": "password", "client_id": "public-client", "username": "alice", "password": "wrong-password"},
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("credentials", "why"),
    [
        ({"client_id": "public-client", "client_secret": "made-up-secret"}, "a public client has no secret"),
        ({"client_id": "pw-client"}, "a confidential client must authenticate"),
    ],
)
def test_client_authentication_matches_the_registered_method(http, idp, credentials, why):
    form = {"grant_type": "password", "username": "alice", "password": idp.password("alice"), **credentials}

    response = _token(http, idp, form)

    assert response.status_code == 401, why
    assert response.json()["error"] == "invalid_client"


def test_totp_user_needs_a_current_code(http, idp):
    form = {"grant_type": "password", "client_id": "public-client", "username": "bob", "password": idp.password("bob")}
    totp = pyotp.TOTP(BOB_TOTP_SEED)
    accepted = {totp.at(time.time() + 30 * step) for step in (-1, 0, 1)}
    wrong = next(code for code in (f"{n:06d}" for n in range(1_000_000)) if code not in accepted)

    with_code = _token(http, idp, {**form, "totp": idp.totp("bob")})
    with_wrong_code = _token(http, idp, {**form, "totp": wrong})
    without_code = _token(http, idp, form)

    assert with_code.status_code == 200, with_code.text
    for response in (with_wrong_code, without_code):
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"


# -- refresh: rotation and reuse protection ---------------------------------------------


def test_refresh_rotates_and_a_replayed_refresh_token_revokes_the_family(http, idp):
    first = _password_login(http, idp)

    second = _refresh(http, idp, first["refresh_token"])
    assert second.status_code == 200, second.text
    second = second.json()
    assert second["refresh_token"] != first["refresh_token"]
    third = _refresh(http, idp, second["refresh_token"])
    assert third.status_code == 200, third.text
    third = third.json()
    assert idp.introspect(third["access_token"])["active"] is True

    replay = _refresh(http, idp, first["refresh_token"])

    assert replay.status_code == 400
    assert replay.json()["error"] == "invalid_grant"
    # DOT's REFRESH_TOKEN_REUSE_PROTECTION: the replay revoked the whole family, so the
    # newest refresh token and its access token are dead too.
    latest = _refresh(http, idp, third["refresh_token"])
    assert latest.status_code == 400
    assert latest.json()["error"] == "invalid_grant"
    assert idp.introspect(third["access_token"]) == {"active": False}


def test_a_rotated_refresh_token_is_dead_at_once(http, idp):
    first = _password_login(http, idp)
    assert _refresh(http, idp, first["refresh_token"]).status_code == 200

    again = _refresh(http, idp, first["refresh_token"])

    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"


# -- private_key_jwt --------------------------------------------------------------------


@pytest.mark.parametrize("client_id", ["jwt-rs-client", "jwt-es-client"])
def test_private_key_jwt(http, idp, client_id):
    response = _token(http, idp, _assertion_form(idp.client_assertion(client_id)))

    assert response.status_code == 200, response.text
    assert idp.introspect(response.json()["access_token"])["client_id"] == client_id


def test_private_key_jwt_accepts_the_issuer_as_audience(http, idp):
    response = _token(http, idp, _assertion_form(idp.client_assertion("jwt-es-client", audience=idp.issuer_url)))

    assert response.status_code == 200, response.text


def test_a_replayed_client_assertion_is_rejected(http, idp):
    assertion = idp.client_assertion("jwt-rs-client")
    assert _token(http, idp, _assertion_form(assertion)).status_code == 200

    replay = _token(http, idp, _assertion_form(assertion))

    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"


@pytest.mark.parametrize(
    "make_form",
    [
        pytest.param(
            lambda idp: _assertion_form(idp.client_assertion("jwt-rs-client", audience="https://elsewhere.example/")),
            id="wrong-audience",
        ),
        pytest.param(
            lambda idp: _assertion_form(client_assertion("jwt-rs-client", idp.jwt_es_private_key_pem, idp.token_url)),
            id="signed-with-another-key",
        ),
        pytest.param(lambda idp: _assertion_form(idp.client_assertion("jwt-rs-client", lifetime=-60)), id="expired"),
        pytest.param(
            lambda idp: _assertion_form(idp.client_assertion("jwt-rs-client", sub="someone-else")), id="sub-not-iss"
        ),
        pytest.param(
            lambda idp: {
                **_assertion_form(idp.client_assertion("jwt-rs-client")),
                "client_assertion_type": "urn:example:other",
            },
            id="wrong-assertion-type",
        ),
        pytest.param(
            lambda idp: {
                "grant_type": "client_credentials",
                "client_id": "jwt-rs-client",
                "client_secret": "any-secret",
            },
            id="secret-instead-of-assertion",
        ),
    ],
)
def test_bad_client_assertions_are_invalid_client(http, idp, make_form):
    response = _token(http, idp, make_form(idp))

    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"


# -- introspection and counters ---------------------------------------------------------


def test_introspection(http, idp):
    token = _password_login(http, idp)["access_token"]

    active = idp.introspect(token)

    assert active["active"] is True
    assert active["client_id"] == "public-client"
    assert active["username"] == "alice"
    assert active["exp"] > time.time() + 3000
    assert idp.introspect("not-a-token") == {"active": False}


def test_token_request_counters(http, idp):
    before_ok = idp.token_request_count("cc-client", "client_credentials", 200)
    before_all = idp.token_request_count("cc-client")
    secret = idp.client_secret("cc-client")

    _token(http, idp, {"grant_type": "client_credentials"}, auth=("cc-client", secret))
    _token(http, idp, {"grant_type": "client_credentials", "client_id": "cc-client", "client_secret": secret})
    _token(http, idp, {"grant_type": "client_credentials"}, auth=("cc-client", "wrong-secret"))

    assert idp.token_request_count("cc-client", "client_credentials", 200) == before_ok + 2
    assert idp.token_request_count("cc-client") == before_all + 3


def test_admin_endpoints_need_the_admin_token(http, idp):
    response = http.post(f"{idp.url}/admin-test/users/alice/password", json={"password": "x"})

    assert response.status_code == 401


# -- a second, short-lived IdP that tests may change ------------------------------------


def test_short_lived_idp_and_admin_changes(http, make_idp):
    idp = make_idp(fresh=True, access_token_lifetime=2)
    cc_secret = idp.client_secret("cc-client")
    login = _password_login(http, idp)
    assert login["expires_in"] == 2

    idp.rotate_client_secret("cc-client", "cc-secret-rotated-7d1e")
    idp.set_password("alice", "alice-new-password-secret")
    revoked = idp.revoke_client_tokens("public-client")

    old_secret = _token(http, idp, {"grant_type": "client_credentials"}, auth=("cc-client", cc_secret))
    new_secret = _token(http, idp, {"grant_type": "client_credentials"}, auth=("cc-client", "cc-secret-rotated-7d1e"))
    assert (old_secret.status_code, new_secret.status_code) == (401, 200)
    old_password = {"grant_type": "password", "client_id": "public-client", "username": "alice", "password": "x"}
    assert _token(http, idp, {**old_password, "password": idp.password("alice")}).status_code == 400
    assert _token(http, idp, {**old_password, "password": "alice-new-password-secret"}).status_code == 200
    assert revoked == {"client_id": "public-client", "refresh_tokens": 1, "access_tokens": 1}
    assert idp.introspect(login["access_token"]) == {"active": False}
    assert _refresh(http, idp, login["refresh_token"]).json()["error"] == "invalid_grant"
    assert idp.stop() == 0, "SIGTERM should shut the IdP down cleanly"


def test_restart_keeps_port_and_tokens(http, make_idp):
    idp = make_idp(fresh=True)
    login = _password_login(http, idp)
    assert idp.stop() == 0

    with pytest.raises(httpx.ConnectError):
        http.post(idp.token_url, data={"grant_type": "client_credentials"})
    idp.start()

    assert idp.introspect(login["access_token"])["active"] is True
    assert _refresh(http, idp, login["refresh_token"]).status_code == 200


# -- the in-process API (in a child process: Django settings are global) ---------------


def test_start_idp_in_process(tmp_path):
    script = textwrap.dedent(
        """
        import httpx
        from tokensync.devkit.idp import IdpConfig, start_idp

        config = IdpConfig.model_validate({"clients": [
            {"client_id": "c", "client_secret": "c-secret-1", "grant_types": ["client_credentials"]}]})
        with start_idp(config) as idp:
            discovery = httpx.get(idp.discovery_url).json()
            assert discovery["token_endpoint"] == idp.token_url, discovery
            token = httpx.post(idp.token_url, data={"grant_type": "client_credentials"}, auth=("c", "c-secret-1"))
            assert token.status_code == 200, token.text
            assert idp.admin.introspect(token.json()["access_token"])["active"] is True
            assert idp.admin.token_request_count("c") == 1
            state_dir = idp.state_dir
        assert not state_dir.exists(), "a temporary state dir is removed on stop"
        print("OK")
        """
    )

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "OK\n"


# -- configuration validation (no server) -----------------------------------------------


@pytest.mark.parametrize(
    "client",
    [
        {"client_id": "x", "client_secret": "s-secret", "auth_method": "none", "grant_types": ["password"]},
        {"client_id": "x", "grant_types": ["client_credentials"]},  # public: cannot use client_credentials
        {"client_id": "x", "client_secret": "s-secret", "auth_method": "private_key_jwt"},
        {"client_id": "x", "client_secret": "s-secret", "grant_types": ["refresh_token"]},
        {"client_id": "x", "public_key_pem": "not a key"},
    ],
)
def test_inconsistent_clients_are_rejected(client):
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's ValidationError is a ValueError
        ClientConfig.model_validate(client)


def test_secret_methods_are_interchangeable_unless_strict():
    lenient = ClientConfig.model_validate({"client_id": "x", "client_secret": "s-secret"})
    strict = lenient.model_copy(update={"strict_auth_method": True})

    assert lenient.accepts("client_secret_post")
    assert not strict.accepts("client_secret_post")
    assert not lenient.accepts("private_key_jwt")


def test_config_masks_secrets_except_in_its_file_format():
    config = IdpConfig.model_validate(
        {"clients": [{"client_id": "x", "client_secret": "x-secret-1"}], "users": [{"username": "u", "password": "p"}]}
    )

    assert "x-secret-1" not in repr(config)
    assert "x-secret-1" not in config.model_dump_json()
    assert IdpConfig.from_json(config.to_json()) == config
