"""FileStore: owner-only from the first byte, atomic replacement, and real cross-process use."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from tokensync.models import TokenSet, utcnow
from tokensync.stores import FileStore, StoreError


def make_tokens(tag: str) -> TokenSet:
    issued = utcnow().replace(microsecond=0)
    return TokenSet(
        access_token=SecretStr(f"test-secret-access-{tag}"),
        refresh_token=SecretStr(f"test-secret-refresh-{tag}"),
        issued_at=issued,
        expires_at=issued + timedelta(hours=1),
    )


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


# Audit hooks cannot be removed once added, so one hook for the rest of the session (added
# on first use), which only records while a test has put a list here. It sees the file system
# calls the store really makes: the creation flags, and the file's mode at the instants it
# exists but is not final yet.
_observed: list[tuple[str, Any]] | None = None
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    observed = _observed
    if observed is None:
        return
    if event == "open" and isinstance(args[0], str | os.PathLike):
        observed.append(("open", (os.fspath(args[0]), args[2])))
    elif event == "os.chmod" and isinstance(args[0], int):
        # fchmod(fd): the mode the file was *created* with, before the chmod applies.
        observed.append(("created-mode", stat.S_IMODE(os.fstat(args[0]).st_mode)))
    elif event == "os.rename":
        source = os.fspath(args[0])
        observed.append(("renamed-mode", (source, stat.S_IMODE(os.stat(source).st_mode))))


@contextmanager
def observe() -> Iterator[list[tuple[str, Any]]]:
    global _observed, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    _observed = []
    try:
        yield _observed
    finally:
        _observed = None


# -- permissions ---------------------------------------------------------------------------------


def test_file_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = FileStore.for_tokens(path)
    store.save(make_tokens("mode"))
    assert mode_of(path) == 0o600
    store.save(make_tokens("mode-again"))
    assert mode_of(path) == 0o600


def test_file_is_owner_only_even_when_it_was_not(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{}")
    path.chmod(0o644)
    FileStore.for_tokens(path).save(make_tokens("widened"))
    assert mode_of(path) == 0o600  # a new inode, not the old one rewritten


def test_file_is_never_world_readable_while_written(tmp_path: Path) -> None:
    # umask 0 takes away the usual safety net: whatever mode the store asks for is what it gets.
    path = tmp_path / "tokens.json"
    with umask(0), observe() as events:
        FileStore.for_tokens(path).save(make_tokens("window"))

    opens = [args for name, args in events if name == "open" and Path(args[0]).parent == tmp_path]
    assert len(opens) == 1, "exactly one file is created, and it is not the final one"
    created, flags = opens[0]
    assert created != str(path)
    assert flags & os.O_CREAT and flags & os.O_EXCL
    assert all(mode == 0o600 for name, mode in events if name == "created-mode")
    renames = [args for name, args in events if name == "renamed-mode"]
    assert renames == [(created, 0o600)]
    assert mode_of(path) == 0o600
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_parent_directories_are_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "tokens.json"
    with umask(0):
        FileStore.for_tokens(path).save(make_tokens("parents"))
    for directory in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"):
        assert mode_of(directory) == 0o700, directory
    assert mode_of(path) == 0o600


def test_existing_parent_directories_are_left_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    FileStore.for_tokens(shared / "tokens.json").save(make_tokens("shared"))
    assert mode_of(shared) == 0o755


# -- atomicity -----------------------------------------------------------------------------------


def test_failing_codec_leaves_the_old_value(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    good = FileStore.for_tokens(path)
    good.save(make_tokens("old"))
    before = path.read_bytes()

    def explode(value: TokenSet) -> str:
        raise RuntimeError("codec failed")

    broken = FileStore[TokenSet](path, serialize=explode, deserialize=TokenSet.from_json)
    with pytest.raises(RuntimeError, match="codec failed"):
        broken.save(make_tokens("new"))
    assert path.read_bytes() == before
    assert good.load() == TokenSet.from_json(before)
    assert sorted(tmp_path.iterdir()) == [path]


def test_failing_replace_cleans_up_and_raises_store_error(tmp_path: Path) -> None:
    # The target is a non-empty directory: the temporary file is written, the rename fails.
    path = tmp_path / "tokens.json"
    path.mkdir()
    (path / "keep").write_text("x")
    store = FileStore.for_tokens(path)
    with pytest.raises(StoreError) as info:
        store.save(make_tokens("blocked"))
    assert "test-secret" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json"]


def test_unreadable_path_is_a_store_error_not_none(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.mkdir()
    with pytest.raises(StoreError, match=r"tokens\.json"):
        FileStore.for_tokens(path).load()


# -- plain file behaviour -------------------------------------------------------------------------


def test_missing_file_loads_none_and_clears_fine(tmp_path: Path) -> None:
    store = FileStore.for_tokens(tmp_path / "nowhere" / "tokens.json")
    assert store.load() is None
    store.clear()
    assert not (tmp_path / "nowhere").exists()  # reading and clearing create nothing


def test_clear_removes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    store = FileStore.for_tokens(path)
    store.save(make_tokens("gone"))
    store.clear()
    assert not path.exists()


def test_the_file_is_json_not_pickle(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens = make_tokens("json")
    FileStore.for_tokens(path).save(tokens)
    assert TokenSet.from_json(path.read_text()) == tokens


def test_repr_names_the_path_only(tmp_path: Path) -> None:
    store = FileStore.for_tokens(tmp_path / "tokens.json")
    store.save(make_tokens("repr"))
    assert "tokens.json" in repr(store)
    assert "test-secret" not in repr(store)
    assert store.path == tmp_path / "tokens.json"


# -- across processes ------------------------------------------------------------------------------

WRITER = """
import sys
from datetime import timedelta
from pydantic import SecretStr
from tokensync.models import TokenSet, utcnow
from tokensync.stores import FileStore
tokens = TokenSet(
    access_token=SecretStr("test-secret-access-cli"),
    refresh_token=SecretStr("test-secret-refresh-cli"),
    issued_at=utcnow(),
    expires_at=utcnow() + timedelta(hours=1),
)
FileStore.for_tokens(sys.argv[1]).save(tokens)
"""

READER = """
import sys
from tokensync.stores import FileStore
tokens = FileStore.for_tokens(sys.argv[1]).load()
print(tokens is not None and tokens.access_token.get_secret_value() == sys.argv[2])
"""


def test_a_login_in_another_process_survives(tmp_path: Path) -> None:
    path = tmp_path / "home" / ".tokensync" / "tokens.json"
    subprocess.run([sys.executable, "-c", WRITER, str(path)], check=True, timeout=60)
    loaded = FileStore.for_tokens(path).load()
    assert loaded is not None
    assert loaded.access_token.get_secret_value() == "test-secret-access-cli"
    assert loaded.refresh_token is not None
    assert loaded.refresh_token.get_secret_value() == "test-secret-refresh-cli"
    assert mode_of(path) == 0o600
    assert mode_of(path.parent) == 0o700


def test_another_process_reads_what_we_wrote(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    FileStore.for_tokens(path).save(make_tokens("shared"))
    result = subprocess.run(
        [sys.executable, "-c", READER, str(path), "test-secret-access-shared"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "True"
