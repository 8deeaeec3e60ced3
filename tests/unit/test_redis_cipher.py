import base64
import os

import pytest
from cryptography.exceptions import InvalidTag
from pydantic import ValidationError

from tokensync.controller.redis_backend import PayloadCipher
from tokensync.models.settings import OperatorSettings

KEY = base64.b64encode(os.urandom(32)).decode()


def test_sealed_payloads_open_only_with_the_same_key_and_binding():
    cipher = PayloadCipher.from_base64(KEY)
    sealed = cipher.seal(b'{"access_token":"test-secret-at"}', bound_to="tokensync:ns/a")
    assert b"test-secret" not in sealed and b"access_token" not in sealed
    assert cipher.open(sealed, bound_to="tokensync:ns/a") == b'{"access_token":"test-secret-at"}'
    with pytest.raises(InvalidTag):
        cipher.open(sealed, bound_to="tokensync:ns/b")  # copied under another credential's key
    with pytest.raises(InvalidTag):
        PayloadCipher.from_base64(base64.b64encode(os.urandom(32)).decode()).open(sealed, bound_to="tokensync:ns/a")
    with pytest.raises(ValueError, match="not a sealed payload"):
        cipher.open(b'{"access_token":"test-secret-at"}', bound_to="tokensync:ns/a")
    assert KEY not in repr(cipher)


def test_a_bad_key_is_refused_when_settings_are_read():
    with pytest.raises(ValidationError, match="base64 of 32 random bytes") as info:
        OperatorSettings(redis_encryption_key=base64.b64encode(b"test-secret-short").decode())
    assert "dGVzdC1zZWNyZXQtc2hvcnQ" not in str(info.value)  # pydantic quotes inputs unless told not to
    assert OperatorSettings(redis_encryption_key=KEY).redis_encryption_key is not None
