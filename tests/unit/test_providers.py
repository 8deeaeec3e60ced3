import base64
from urllib.parse import unquote

import jwt
import pyotp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokensync.auth import (
    DEFAULT_CLIENT_ID,
    ClientCredentialsAuth,
    PasswordAuth,
    RefreshTokenAuth,
    Totp,
    client_auth_for,
)

TOKEN_URL = "https://idp.test/token"
SEED = pyotp.random_base32()


def apply(provider, form=None):
    data = dict(form if form is not None else provider.grant_data())
    headers: dict[str, str] = {}
    provider.client_auth.apply(data=data, headers=headers, token_url=TOKEN_URL)
    return data, headers


def pem(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def test_client_credentials_defaults_to_basic_with_urlencoded_parts():
    provider = ClientCredentialsAuth("my:client", "test-secret-é:/", scopes=["read", "write"], audience="api")
    data, headers = apply(provider)
    assert data == {"grant_type": "client_credentials", "scope": "read write", "audience": "api"}
    user, _, password = base64.b64decode(headers["Authorization"].removeprefix("Basic ")).decode().partition(":")
    assert (unquote(user), unquote(password)) == ("my:client", "test-secret-é:/")


def test_client_secret_post_puts_credentials_in_the_form():
    provider = ClientCredentialsAuth(
        "c1", "test-secret-post", method="client_secret_post", extra_params={"resource": "r"}
    )
    data, headers = apply(provider)
    assert data == {
        "grant_type": "client_credentials",
        "client_id": "c1",
        "client_secret": "test-secret-post",
        "resource": "r",
    }
    assert "Authorization" not in headers


def test_client_credentials_refuses_a_public_client():
    with pytest.raises(ValueError, match="authenticated client"):
        ClientCredentialsAuth("c1", method="none")


def test_password_grant_as_public_client_with_default_client_id():
    provider = PasswordAuth("alice", "test-secret-pw")
    data, headers = apply(provider)
    assert data == {
        "grant_type": "password",
        "username": "alice",
        "password": "test-secret-pw",
        "client_id": DEFAULT_CLIENT_ID,
    }
    assert headers == {}
    assert provider.can_reauthenticate


def test_totp_seed_is_turned_into_the_current_code_at_grant_time():
    provider = PasswordAuth("bob", "test-secret-pw", totp=SEED, client_id="c", client_secret="test-secret-c")
    data, _ = apply(provider)
    assert pyotp.TOTP(SEED).verify(data["totp"], valid_window=1)


def test_totp_one_time_code_is_sent_as_is_and_field_name_is_configurable():
    provider = PasswordAuth("bob", "test-secret-pw", totp="123456", totp_field="otp")
    assert provider.grant_data()["otp"] == "123456"


def test_totp_bad_seed_is_refused_without_echoing_it():
    with pytest.raises(ValueError, match="not valid base32") as info:
        Totp.parse("test-secret-not-base32!")
    assert "test-secret" not in str(info.value)
    assert info.value.__cause__ is None


def test_refresh_token_provider_cannot_reauthenticate():
    provider = RefreshTokenAuth("test-secret-rt", scopes=["s"])
    assert provider.grant_data() == {
        "grant_type": "refresh_token",
        "refresh_token": "test-secret-rt",
        "scope": "s",
    }
    assert not provider.can_reauthenticate


def test_refresh_form_asks_for_the_original_scope():
    provider = ClientCredentialsAuth("c1", "test-secret-c", scopes=["a"])
    assert provider.refresh_data("test-secret-rt") == {
        "grant_type": "refresh_token",
        "refresh_token": "test-secret-rt",
    }


@pytest.mark.parametrize(
    ("algorithm", "key"),
    [
        ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES256", ec.generate_private_key(ec.SECP256R1())),
    ],
)
def test_private_key_jwt_signs_a_fresh_assertion_per_request(algorithm, key):
    provider = ClientCredentialsAuth("jwt-client", private_key=pem(key), signing_algorithm=algorithm, key_id="k1")
    first, headers = apply(provider)
    second, _ = apply(provider)
    assert "Authorization" not in headers
    assert first["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    claims = jwt.decode(first["client_assertion"], key.public_key(), algorithms=[algorithm], audience=TOKEN_URL)
    again = jwt.decode(second["client_assertion"], key.public_key(), algorithms=[algorithm], audience=TOKEN_URL)
    assert claims["iss"] == claims["sub"] == "jwt-client"
    assert claims["exp"] > claims["iat"]
    assert claims["jti"] != again["jti"]
    assert jwt.get_unverified_header(first["client_assertion"])["kid"] == "k1"


def test_client_auth_factory_names_what_is_missing():
    with pytest.raises(ValueError, match="needs a client secret"):
        client_auth_for("client_secret_post", "c")
    with pytest.raises(ValueError, match="needs a private key"):
        client_auth_for("private_key_jwt", "c")
    assert client_auth_for(None, "c").method == "none"
    assert client_auth_for(None, "c", client_secret="test-secret-x").method == "client_secret_basic"


def test_reprs_never_show_secrets():
    key = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    providers = [
        ClientCredentialsAuth("c1", "test-secret-cc"),
        ClientCredentialsAuth("c1", "test-secret-cc", method="client_secret_post"),
        ClientCredentialsAuth("c1", private_key=key),
        PasswordAuth("alice", "test-secret-pw", totp=SEED, client_secret="test-secret-cs"),
        RefreshTokenAuth("test-secret-rt"),
    ]
    for provider in providers:
        for text in (repr(provider), repr(provider.client_auth), str(provider)):
            assert "test-secret" not in text
            assert "PRIVATE KEY" not in text
            assert SEED not in text


def test_a_bad_private_key_is_refused_when_the_provider_is_built():
    rsa_key = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(ValueError, match="not a PEM key usable with RS256") as info:
        ClientCredentialsAuth("c", private_key="-----BEGIN PRIVATE KEY-----\ntest-secret\n-----END PRIVATE KEY-----")
    assert "test-secret" not in str(info.value) and info.value.__cause__ is None
    with pytest.raises(ValueError, match="usable with ES256"):
        ClientCredentialsAuth("c", private_key=rsa_key, signing_algorithm="ES256")
