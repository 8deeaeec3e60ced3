import pytest

from tokensync.auth import ClientCredentialsAuth, PasswordAuth, RefreshTokenAuth
from tokensync.auth.spec import (
    insecure_url_problem,
    normalise_secret_value,
    provider_from_spec,
    spec_references,
    ssl_context_for_ca,
)
from tokensync.models.credential import CredentialSpec, GrantSpec, IssuerSpec

REF = {"name": "s", "key": "k"}


def grant(**fields):
    return GrantSpec.model_validate({"clientID": "c", **fields})


def test_each_grant_type_becomes_its_provider():
    cc = provider_from_spec(
        grant(type="client_credentials", clientSecretRef=REF), {"grant.clientSecretRef": "test-secret-c"}
    )
    assert isinstance(cc, ClientCredentialsAuth) and cc.client_auth.method == "client_secret_basic"
    pw = provider_from_spec(
        grant(type="password", usernameRef=REF, passwordRef=REF, totpSecretRef=REF, scopes=["a"]),
        {
            "grant.usernameRef": "u",
            "grant.passwordRef": "test-secret-p",
            "grant.totpSecretRef": "JBSW Y3DP EHPK 3PXP JBSW Y3DP EHPK 3PXP",
        },
    )
    assert isinstance(pw, PasswordAuth) and pw.totp is not None and pw.grant_data()["scope"] == "a"
    rt = provider_from_spec(
        grant(type="refresh_token", refreshTokenRef=REF), {"grant.refreshTokenRef": "test-secret-r"}
    )
    assert isinstance(rt, RefreshTokenAuth) and not rt.can_reauthenticate


def test_problems_name_the_field_and_never_the_value():
    with pytest.raises(ValueError, match=r"no value for grant\.passwordRef"):
        provider_from_spec(grant(type="password", usernameRef=REF, passwordRef=REF), {"grant.usernameRef": "u"})
    with pytest.raises(ValueError, match="not valid base32") as info:
        provider_from_spec(
            grant(type="password", usernameRef=REF, passwordRef=REF, totpSecretRef=REF),
            {"grant.usernameRef": "u", "grant.passwordRef": "p", "grant.totpSecretRef": "test-secret-!!"},
        )
    assert "test-secret" not in str(info.value)
    with pytest.raises(ValueError, match="at least 112 bits"):
        provider_from_spec(
            grant(type="password", usernameRef=REF, passwordRef=REF, totpSecretRef=REF),
            {"grant.usernameRef": "u", "grant.passwordRef": "p", "grant.totpSecretRef": "JBSWY3DPEHPK3PXP"},
        )


def test_references_include_the_ca_bundle():
    spec = CredentialSpec.model_validate(
        {
            "issuer": {"tokenURL": "https://x/t", "caSecretRef": {"name": "ca", "key": "ca.crt"}},
            "grant": {"type": "client_credentials", "clientID": "c", "clientSecretRef": REF},
        }
    )
    assert set(spec_references(spec)) == {"grant.clientSecretRef", "issuer.caSecretRef"}


def test_plain_http_only_to_loopback_unless_allowed():
    def issuer(url):
        return IssuerSpec.model_validate({"tokenURL": url})

    assert insecure_url_problem(issuer("http://127.0.0.1:8080/t"), allow_insecure_http=False) is None
    assert insecure_url_problem(issuer("http://localhost/t"), allow_insecure_http=False) is None
    assert "issuer.tokenURL uses plain http" in insecure_url_problem(
        issuer("http://idp.corp/t"), allow_insecure_http=False
    )
    assert insecure_url_problem(issuer("http://idp.corp/t"), allow_insecure_http=True) is None
    assert insecure_url_problem(issuer("https://idp.corp/t"), allow_insecure_http=False) is None


def test_value_clean_up_and_ca_bundle_errors():
    assert normalise_secret_value("test-secret\n") == "test-secret"
    pem = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"
    assert normalise_secret_value(pem) == pem
    with pytest.raises(ValueError, match=r"issuer\.caSecretRef: the CA bundle is not valid PEM"):
        ssl_context_for_ca("not a certificate")


def test_url_policy_matches_prefixes_at_path_boundaries_only():
    from tokensync.auth.spec import policy_problem, url_allowed

    prefixes = ["https://idp.example.com", "https://login.corp/realms/a/"]
    assert url_allowed("https://IDP.example.com/oauth2/token", prefixes)
    assert url_allowed("https://login.corp/realms/a/protocol/token", prefixes)
    assert not url_allowed("https://idp.example.com.evil.io/token", prefixes)
    assert not url_allowed("https://login.corp/realms/ab/token", prefixes)
    assert not url_allowed("http://idp.example.com/token", prefixes)
    assert not url_allowed("https://10.0.0.1/token", prefixes)
    assert url_allowed("https://anything/at/all", [])
    problem = policy_problem("issuer.tokenURL", "https://10.0.0.1/token", prefixes)
    assert problem is not None and problem.startswith("issuer.tokenURL https://10.0.0.1/token is not allowed")
