import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from tokensync.models import TokenSet, jwt_expiry

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def make_jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


def test_relative_lifetimes_become_absolute_utc_instants():
    ts = TokenSet.from_response(
        {
            "access_token": "test-secret-at",
            "expires_in": 300,
            "refresh_token": "test-secret-rt",
            "refresh_expires_in": "1800",
            "scope": "a b",
            "token_type": "bearer",
        },
        now=NOW,
    )
    assert ts.expires_at == NOW + timedelta(seconds=300)
    assert ts.refresh_expires_at == NOW + timedelta(seconds=1800)
    assert ts.issued_at == NOW
    assert ts.lifetime == 300
    assert ts.scope == "a b"
    assert ts.token_type == "Bearer"
    assert ts.authorization_header == "Bearer test-secret-at"


def test_jwt_exp_claim_is_used_when_expires_in_is_missing():
    exp = int((NOW + timedelta(minutes=5)).timestamp())
    ts = TokenSet.from_response({"access_token": make_jwt({"exp": exp})}, now=NOW)
    assert ts.expires_at == datetime.fromtimestamp(exp, UTC)


def test_refresh_token_jwt_exp_gives_refresh_expiry():
    exp = int((NOW + timedelta(hours=8)).timestamp())
    ts = TokenSet.from_response(
        {"access_token": "test-secret-at", "expires_in": 60, "refresh_token": make_jwt({"exp": exp})}, now=NOW
    )
    assert ts.refresh_expires_at == datetime.fromtimestamp(exp, UTC)


@pytest.mark.parametrize("token", ["opaque-test-secret", "a.b", "x.!!!.y", make_jwt({"exp": "soon"}), make_jwt({})])
def test_unknown_expiry_stays_unknown(token):
    assert jwt_expiry(token) is None
    ts = TokenSet.from_response({"access_token": token}, now=NOW)
    assert ts.expires_at is None
    assert ts.access_valid(skew=10**6)


def test_validity_honours_skew():
    ts = TokenSet.from_response({"access_token": "test-secret-at", "expires_in": 60}, now=NOW)
    assert ts.access_valid(now=NOW + timedelta(seconds=29), skew=30)
    assert not ts.access_valid(now=NOW + timedelta(seconds=31), skew=30)
    assert not ts.access_valid(now=NOW + timedelta(seconds=60))


def test_refresh_validity():
    no_rt = TokenSet.from_response({"access_token": "test-secret-at"}, now=NOW)
    assert not no_rt.refresh_valid()
    forever = TokenSet.from_response({"access_token": "test-secret-at", "refresh_token": "test-secret-rt"}, now=NOW)
    assert forever.refresh_valid(now=NOW + timedelta(days=365))
    bounded = TokenSet.from_response(
        {"access_token": "test-secret-at", "refresh_token": "test-secret-rt", "refresh_expires_in": 100},
        now=NOW,
    )
    assert bounded.refresh_valid(now=NOW + timedelta(seconds=50), skew=10)
    assert not bounded.refresh_valid(now=NOW + timedelta(seconds=95), skew=10)


def test_previous_refresh_token_is_kept_when_the_server_does_not_rotate():
    ts = TokenSet.from_response(
        {"access_token": "test-secret-at2"}, now=NOW, previous_refresh_token=SecretStr("test-secret-rt")
    )
    assert ts.refresh_token is not None
    assert ts.refresh_token.get_secret_value() == "test-secret-rt"


def test_values_never_show_in_repr_str_or_model_dump():
    ts = TokenSet.from_response(
        {"access_token": "test-secret-at", "refresh_token": "test-secret-rt", "id_token": "test-secret-id"},
        now=NOW,
    )
    for text in (repr(ts), str(ts), str(ts.model_dump()), ts.model_dump_json()):
        assert "test-secret" not in text


def test_json_round_trip_for_stores():
    ts = TokenSet.from_response(
        {
            "access_token": "test-secret-at",
            "refresh_token": "test-secret-rt",
            "id_token": "test-secret-id",
            "expires_in": 60,
            "refresh_expires_in": 600,
            "scope": "read",
        },
        now=NOW,
    )
    again = TokenSet.from_json(ts.to_json())
    assert again == ts
    assert again.access_token.get_secret_value() == "test-secret-at"


def test_naive_datetimes_are_taken_as_utc():
    ts = TokenSet(
        access_token=SecretStr("test-secret-at"),
        issued_at=datetime(2026, 1, 1),
        expires_at=datetime(2026, 1, 2),
    )
    assert ts.issued_at.tzinfo is UTC
    assert ts.expires_at is not None and ts.expires_at.tzinfo is UTC


@pytest.mark.parametrize("payload", [{}, {"access_token": ""}, {"access_token": 5}])
def test_a_body_without_a_token_is_refused(payload):
    with pytest.raises(ValueError, match="no access_token"):
        TokenSet.from_response(payload)


def test_a_damaged_store_payload_raises_value_error():
    with pytest.raises(ValueError, match="validation error"):
        TokenSet.from_json('{"access_token": 1')


@pytest.mark.parametrize("lifetime", [1e400, "inf", 10**30, "nan"])
def test_absurd_lifetimes_are_capped_or_ignored_not_crashes(lifetime):
    ts = TokenSet.from_response({"access_token": "test-secret-at", "expires_in": lifetime}, now=NOW)
    assert ts.expires_at is None or ts.expires_at <= NOW + timedelta(days=3651)
