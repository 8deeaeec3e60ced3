"""
A token store in the operating system's keyring (macOS Keychain, Windows
Credential Locker, Secret Service on Linux desktops), for interactive CLI use.

Unlike the other stores, this one is specific to :class:`~tokensync.models.TokenSet`:

* Each token is its own keyring entry (``<for_endpoint>#access_token``,
  ``#refresh_token``, ``#id_token``), because backends limit the size of one
  secret (Windows: 2560 bytes) and an access token plus an id token can exceed it.
* A fourth entry, ``<for_endpoint>#metadata``, holds the rest as JSON, with no
  secrets in it. It is written *last* and deleted *first*: it is the commit marker.
  A save interrupted half-way leaves no metadata, so ``load()`` says "nothing
  stored" instead of pairing a new access token with an old refresh token.
  Concurrent writers are last-writer-wins per entry; a keyring has no transactions.

The keyring is a convenience, not a requirement, so this store degrades instead
of failing: when the optional ``keyring`` package is not installed, when the only
backend is keyring's ``fail.Keyring`` or a not-recommended one (priority < 1,
e.g. keyrings.alt's plaintext file, the same threshold keyring itself uses), or
when the backend raises at use (locked, no D-Bus session), the store logs *one*
warning per store instance and from then on does not persist anything: ``load()``
gives ``None``, ``save()`` and ``clear()`` do nothing. A backend injected
explicitly (``backend=...``) is trusted whatever its priority: the caller chose it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

from tokensync.models import TokenSet
from tokensync.stores.base import CredentialStore, decode_or_none

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend

__all__ = ["KeyringStore"]

logger = logging.getLogger(__name__)

_SECRETS = ("access_token", "refresh_token", "id_token")
_METADATA = "metadata"
_METADATA_VERSION = 1


class KeyringStore(CredentialStore[TokenSet]):
    """
    One token set in the OS keyring, under entries named after ``for_endpoint``.

    The backend is resolved lazily, on first use, so that constructing a store
    (e.g. while parsing CLI options) never probes D-Bus or the Keychain.
    """

    def __init__(
        self,
        for_endpoint: str,
        *,
        service: str = "tokensync",
        backend: KeyringBackend | None = None,
    ) -> None:
        self._endpoint = for_endpoint
        self._service = service
        self._injected = backend
        self._backend: KeyringBackend | None = None
        self._resolved = False
        self._warned = False

    @property
    def for_endpoint(self) -> str:
        return self._endpoint

    @property
    def service(self) -> str:
        return self._service

    def __repr__(self) -> str:
        return f"{type(self).__name__}(for_endpoint={self._endpoint!r}, service={self._service!r})"

    def load(self) -> TokenSet | None:
        backend = self._usable_backend()
        if backend is None:
            return None
        try:
            metadata = backend.get_password(self._service, self._username(_METADATA))
            values = {name: backend.get_password(self._service, self._username(name)) for name in _SECRETS}
        except Exception as exc:
            self._degrade(f"the keyring failed to read ({type(exc).__name__})")
            return None
        if metadata is None or values["access_token"] is None:
            return None

        def decode(payload: str | bytes) -> TokenSet:
            fields: Any = json.loads(payload)
            if not isinstance(fields, dict):
                raise TypeError("the metadata is not a JSON object")
            return TokenSet.model_validate({**fields, **values})

        return decode_or_none(decode, metadata, logger=logger, where=repr(self))

    def save(self, value: TokenSet) -> None:
        backend = self._usable_backend()
        if backend is None:
            return
        fields = value.to_dict()
        secrets = {name: fields.pop(name) for name in _SECRETS}
        metadata = json.dumps({"version": _METADATA_VERSION, **fields}, separators=(",", ":"), sort_keys=True)
        try:
            self._delete(backend, _METADATA)
            for name, secret in secrets.items():
                if secret is None:
                    self._delete(backend, name)  # "save replaces": no stale refresh/id token
                else:
                    backend.set_password(self._service, self._username(name), secret)
            backend.set_password(self._service, self._username(_METADATA), metadata)
        except Exception as exc:
            self._degrade(f"the keyring failed to write ({type(exc).__name__})")

    def clear(self) -> None:
        backend = self._usable_backend()
        if backend is None:
            return
        try:
            for name in (_METADATA, *_SECRETS):
                self._delete(backend, name)
        except Exception as exc:
            self._degrade(f"the keyring failed to delete ({type(exc).__name__})")

    def _username(self, entry: str) -> str:
        return f"{self._endpoint}#{entry}"

    def _delete(self, backend: KeyringBackend, entry: str) -> None:
        from keyring.errors import PasswordDeleteError

        # Absent already is fine: clearing is idempotent.
        with contextlib.suppress(PasswordDeleteError):
            backend.delete_password(self._service, self._username(entry))

    def _usable_backend(self) -> KeyringBackend | None:
        if not self._resolved:
            self._resolved = True
            self._backend = self._resolve()
        return self._backend

    def _resolve(self) -> KeyringBackend | None:
        # Imported here: keyring is an optional extra, and importing it loads entry points.
        try:
            import keyring
            from keyring.backends import fail
        except ImportError:
            self._degrade("the optional 'keyring' package is not installed (tokensync[keyring])")
            return None
        backend: KeyringBackend
        if self._injected is not None:
            backend = self._injected
        else:
            try:
                backend = keyring.get_keyring()
            except Exception as exc:
                self._degrade(f"no keyring backend could be loaded ({type(exc).__name__})")
                return None
        if isinstance(backend, fail.Keyring):
            self._degrade("no keyring backend is available")
            return None
        if self._injected is None and _priority(backend) < 1:
            self._degrade(f"the only keyring backend, {type(backend).__name__}, is not a recommended one")
            return None
        return backend

    def _degrade(self, reason: str) -> None:
        # Once degraded, stay degraded: retrying a half-working keyring could leave
        # half-written entries, and would repeat OS prompts on every use.
        self._backend = None
        self._resolved = True
        if self._warned:
            logger.debug("%r: %s.", self, reason)
            return
        self._warned = True
        logger.warning("%r: %s; tokens will not be persisted in the keyring.", self, reason)


def _priority(backend: KeyringBackend) -> float:
    # A backend's priority is computed from the environment and may raise while doing so.
    try:
        return float(backend.priority)
    except Exception:
        return 0.0
