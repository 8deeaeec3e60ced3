"""
A store in one local file: what lets ``tokensync login`` survive the process,
so the next command (or another process) picks the tokens up.

The file is a credential, so it is owner-only from the first byte on:

* It is never written in place. A new file is created next to it with
  ``O_CREAT | O_EXCL`` and mode ``0600`` in the very ``open(2)`` call (not a
  ``chmod`` afterwards, which would leave a window where the umask's default,
  often ``0644``, lets other users read it), written, fsync'ed, and then
  ``os.replace``'d over the old one. Readers therefore see either the old value
  or the new one, never half of it; and a failing write leaves the old value
  intact. The temporary file is in the same directory because a rename is only
  atomic within one file system.
* Parent directories that the store creates get ``0700``. Existing ones are left
  alone: they are the user's, and may be shared on purpose.

The payload format is the caller's (``serialize`` / ``deserialize``), and for
tokens it is JSON (:meth:`FileStore.for_tokens`). Never pickle: unpickling runs
code chosen by whoever wrote the file, and a token file is exactly the kind of
file that gets copied around, mounted from Secrets and left in home directories.
A credential is data; reading it must not be able to execute anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path
from typing import TypeVar

from tokensync.models import TokenSet
from tokensync.stores.base import CredentialStore, Deserializer, Serializer, StoreError, decode_or_none

__all__ = ["FileStore"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_FILE_MODE = 0o600
_DIR_MODE = 0o700


class FileStore(CredentialStore[T]):
    """
    One value in one file, replaced atomically, readable by its owner only.

    Concurrent writers (two CLI invocations) do not corrupt each other: each
    writes its own uniquely named temporary file, and the last rename wins.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        serialize: Serializer[T],
        deserialize: Deserializer[T],
    ) -> None:
        self._path = Path(path)
        self._serialize = serialize
        self._deserialize = deserialize

    @classmethod
    def for_tokens(cls, path: str | os.PathLike[str]) -> FileStore[TokenSet]:
        """A store of token sets in their JSON codec, the usual case."""
        return FileStore[TokenSet](path, serialize=TokenSet.to_json, deserialize=TokenSet.from_json)

    @property
    def path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self._path)!r})"

    def load(self) -> T | None:
        try:
            payload = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"Cannot read the credential file {str(self._path)!r}: {_reason(exc)}") from exc
        return decode_or_none(self._deserialize, payload, logger=logger, where=repr(self))

    def save(self, value: T) -> None:
        # Serialise before touching the disk: a failing codec must leave the old value as it was.
        payload = self._serialize(value)
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        try:
            self._make_parents()
            self._replace_with(data)
        except OSError as exc:
            raise StoreError(f"Cannot write the credential file {str(self._path)!r}: {_reason(exc)}") from exc

    def clear(self) -> None:
        try:
            self._path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"Cannot remove the credential file {str(self._path)!r}: {_reason(exc)}") from exc

    def _make_parents(self) -> None:
        # Not os.makedirs(mode=0o700): since Python 3.7, its mode applies to the leaf
        # only, and the intermediate directories get the umask's default (often 0755).
        missing: list[Path] = []
        parent = self._path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another process was faster
                os.mkdir(directory, _DIR_MODE)

    def _replace_with(self, data: bytes) -> None:
        directory = self._path.parent
        temporary = directory / f".{self._path.name}.{secrets.token_hex(8)}.tmp"
        # O_EXCL: never reuse (or follow a symlink planted at) an existing name, which could
        # be someone else's file with wider permissions.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(temporary, flags, _FILE_MODE)
        try:
            try:
                if hasattr(os, "fchmod"):
                    # The umask can only narrow 0600 (e.g. to 0400); make it exactly 0600 so
                    # that the owner can always replace and remove the file later.
                    os.fchmod(fd, _FILE_MODE)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable across a power loss; POSIX only, best effort.
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _reason(exc: OSError) -> str:
    # strerror only: str(exc) repeats the path, which the message already names.
    return exc.strerror or type(exc).__name__
