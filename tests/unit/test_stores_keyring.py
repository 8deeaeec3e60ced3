"""KeyringStore: split entries, a metadata commit marker, and graceful degradation."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import keyring
import keyring.errors
import pytest
from keyring.backend import KeyringBackend
from keyring.backends import fail
from keyrings.alt.file import PlaintextKeyring
from pydantic import SecretStr

from tokensync.models import TokenSet, utcnow
from tokensync.stores import KeyringStore

ENDPOINT = "https://idp.example.test/oauth2/token"


def make_tokens(tag: str, *, refresh: bool = True, id_token: bool = True) -> TokenSet:
    issued = utcnow().replace(microsecond=0)
    return TokenSet(
        access_token=SecretStr(f"test-secret-access-{tag}"),
        refresh_token=SecretStr(f"test-secret-refresh-{tag}") if refresh else None,
        id_token=SecretStr(f"test-secret-id-{tag}") if id_token else None,
        scope="openid",
        issued_at=issued,
        expires_at=issued + timedelta(minutes=5),
        refresh_expires_at=issued + timedelta(hours=8) if refresh else None,
    )


class MemoryKeyring(KeyringBackend):
    """A real keyring backend (keyring's own base class), kept in a dict."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[tuple[str, str], str] = {}
        self.calls = 0

    def get_password(self, service: str, username: str) -> str | None:
        self.calls += 1
        return self.entries.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.calls += 1
        self.entries[service, username] = password

    def delete_password(self, service: str, username: str) -> None:
        self.calls += 1
        if self.entries.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("no such entry")


class FlakyKeyring(MemoryKeyring):
    """Fails on the n-th write, like a keyring that gets locked half-way."""

    def __init__(self, fail_on_write: int) -> None:
        super().__init__()
        self.writes_left = fail_on_write

    def set_password(self, service: str, username: str, password: str) -> None:
        self.writes_left -= 1
        if self.writes_left <= 0:
            raise keyring.errors.KeyringLocked("the keyring got locked")
        super().set_password(service, username, password)


@pytest.fixture
def plaintext_keyring(tmp_path: Path) -> PlaintextKeyring:
    backend = PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring_pass.cfg")
    return backend


@pytest.fixture(params=["memory", "keyrings.alt-plaintext"])
def backend(request: pytest.FixtureRequest, plaintext_keyring: PlaintextKeyring) -> KeyringBackend:
    return MemoryKeyring() if request.param == "memory" else plaintext_keyring


@pytest.fixture
def global_keyring() -> Iterator[None]:
    """Lets a test call keyring.set_keyring() and puts the previous backend back."""
    previous = keyring.get_keyring()
    yield
    keyring.set_keyring(previous)


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.levelno >= logging.WARNING]


# -- with a working backend -------------------------------------------------------------------------


def test_round_trip(backend: KeyringBackend) -> None:
    store = KeyringStore(ENDPOINT, backend=backend)
    assert store.load() is None
    tokens = make_tokens("keyring")
    store.save(tokens)
    assert store.load() == tokens
    # A fresh store on the same keyring sees it: that is the point of persisting.
    assert KeyringStore(ENDPOINT, backend=backend).load() == tokens


def test_entries_are_split_and_metadata_holds_no_secret() -> None:
    backend = MemoryKeyring()
    KeyringStore(ENDPOINT, service="svc", backend=backend).save(make_tokens("split"))
    assert set(backend.entries) == {
        ("svc", f"{ENDPOINT}#access_token"),
        ("svc", f"{ENDPOINT}#refresh_token"),
        ("svc", f"{ENDPOINT}#id_token"),
        ("svc", f"{ENDPOINT}#metadata"),
    }
    assert backend.entries["svc", f"{ENDPOINT}#access_token"] == "test-secret-access-split"
    metadata = backend.entries["svc", f"{ENDPOINT}#metadata"]
    assert "test-secret" not in metadata
    assert set(json.loads(metadata)) >= {
        "token_type",
        "scope",
        "issued_at",
        "expires_at",
        "refresh_expires_at",
    }


def test_save_replaces_and_drops_stale_tokens(backend: KeyringBackend) -> None:
    store = KeyringStore(ENDPOINT, backend=backend)
    store.save(make_tokens("first"))
    second = make_tokens("second", refresh=False, id_token=False)
    store.save(second)
    loaded = store.load()
    assert loaded == second
    assert loaded is not None
    assert loaded.refresh_token is None
    assert backend.get_password("tokensync", f"{ENDPOINT}#refresh_token") is None


def test_clear_is_idempotent(backend: KeyringBackend, caplog: pytest.LogCaptureFixture) -> None:
    store = KeyringStore(ENDPOINT, backend=backend)
    store.clear()  # every entry absent: PasswordDeleteError is not an error here
    store.save(make_tokens("clear"))
    store.clear()
    store.clear()
    assert store.load() is None
    assert warnings_in(caplog) == []
    for entry in ("access_token", "refresh_token", "id_token", "metadata"):
        assert backend.get_password("tokensync", f"{ENDPOINT}#{entry}") is None


def test_endpoints_do_not_collide() -> None:
    backend = MemoryKeyring()
    one = KeyringStore("https://one.example.test/token", backend=backend)
    two = KeyringStore("https://two.example.test/token", backend=backend)
    one.save(make_tokens("one"))
    assert two.load() is None
    two.save(make_tokens("two"))
    one.clear()
    assert two.load() == make_tokens("two")


def test_missing_access_token_loads_none() -> None:
    backend = MemoryKeyring()
    store = KeyringStore(ENDPOINT, backend=backend)
    store.save(make_tokens("partial"))
    backend.delete_password("tokensync", f"{ENDPOINT}#access_token")
    assert store.load() is None


def test_undecodable_metadata_loads_none_and_warns_without_secrets(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryKeyring()
    store = KeyringStore(ENDPOINT, backend=backend)
    store.save(make_tokens("damaged"))
    for damaged in ("{not json", "[1, 2]", '{"issued_at": "test-secret-not-a-date"}'):
        caplog.clear()
        backend.set_password("tokensync", f"{ENDPOINT}#metadata", damaged)
        assert store.load() is None
        assert len(warnings_in(caplog)) == 1
        assert "test-secret" not in caplog.text


def test_interrupted_save_loads_none_not_a_mix(caplog: pytest.LogCaptureFixture) -> None:
    # Metadata is deleted first and written last: a save that dies in between must not
    # pair the new access token with the old refresh token.
    backend = FlakyKeyring(fail_on_write=99)
    KeyringStore(ENDPOINT, backend=backend).save(make_tokens("old"))
    backend.writes_left = 2  # the new access token goes in, the refresh token does not
    store = KeyringStore(ENDPOINT, backend=backend)
    store.save(make_tokens("new"))
    assert len(warnings_in(caplog)) == 1
    assert "test-secret" not in caplog.text
    assert KeyringStore(ENDPOINT, backend=backend).load() is None


def test_repr_shows_no_secret(backend: KeyringBackend) -> None:
    store = KeyringStore(ENDPOINT, backend=backend)
    store.save(make_tokens("repr"))
    assert ENDPOINT in repr(store)
    assert "test-secret" not in repr(store)


# -- without a usable backend ------------------------------------------------------------------------


def exercise(store: KeyringStore) -> None:
    assert store.load() is None
    store.save(make_tokens("nowhere"))
    assert store.load() is None
    store.clear()
    store.clear()
    store.save(make_tokens("nowhere-again"))


def test_fail_backend_degrades_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    store = KeyringStore(ENDPOINT, backend=fail.Keyring())
    exercise(store)
    assert len(warnings_in(caplog)) == 1
    assert "not be persisted" in caplog.text
    assert "test-secret" not in caplog.text


def test_one_warning_per_store_instance(caplog: pytest.LogCaptureFixture) -> None:
    exercise(KeyringStore(ENDPOINT, backend=fail.Keyring()))
    exercise(KeyringStore(ENDPOINT, backend=fail.Keyring()))
    assert len(warnings_in(caplog)) == 2


def test_errors_at_use_degrade_for_good(caplog: pytest.LogCaptureFixture) -> None:
    class LockedKeyring(MemoryKeyring):
        def get_password(self, service: str, username: str) -> str | None:
            self.calls += 1
            raise keyring.errors.KeyringLocked("locked")

    backend = LockedKeyring()
    store = KeyringStore(ENDPOINT, backend=backend)
    exercise(store)
    assert backend.calls == 1  # the first failure stops all further use
    assert len(warnings_in(caplog)) == 1
    assert "KeyringLocked" in caplog.text


def test_no_keyring_error_at_use(caplog: pytest.LogCaptureFixture) -> None:
    class GoneKeyring(MemoryKeyring):
        def set_password(self, service: str, username: str, password: str) -> None:
            raise keyring.errors.NoKeyringError("no backend")

    store = KeyringStore(ENDPOINT, backend=GoneKeyring())
    exercise(store)
    assert len(warnings_in(caplog)) == 1
    assert "test-secret" not in caplog.text


def test_keyring_not_installed(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # None in sys.modules makes `import keyring` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "keyring", None)
    store = KeyringStore(ENDPOINT)
    exercise(store)
    assert len(warnings_in(caplog)) == 1
    assert "tokensync[keyring]" in caplog.text


def test_auto_detected_fail_backend(global_keyring: None, caplog: pytest.LogCaptureFixture) -> None:
    keyring.set_keyring(fail.Keyring())
    exercise(KeyringStore(ENDPOINT))
    assert len(warnings_in(caplog)) == 1


def test_auto_detected_low_priority_backend_is_not_used(
    global_keyring: None, plaintext_keyring: PlaintextKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    # Left to itself, keyring would happily pick the plaintext file (priority 0.5).
    keyring.set_keyring(plaintext_keyring)
    exercise(KeyringStore(ENDPOINT))
    assert len(warnings_in(caplog)) == 1
    assert "PlaintextKeyring" in caplog.text
    assert not Path(plaintext_keyring.file_path).exists()


def test_auto_detected_recommended_backend_is_used(global_keyring: None) -> None:
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    store = KeyringStore(ENDPOINT)
    tokens = make_tokens("auto")
    store.save(tokens)
    assert store.load() == tokens
    assert backend.entries


def test_construction_touches_nothing() -> None:
    backend = MemoryKeyring()
    KeyringStore(ENDPOINT, backend=backend)
    assert backend.calls == 0
