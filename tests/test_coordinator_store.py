"""The file store and sealing: atomic replacement, one writer, integrity, platform binding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshproxy._redact import Secret
from meshproxy.coordinator import _seal
from meshproxy.coordinator._store import FileStore
from meshproxy.errors import StoreError


class KeySealer:
    name = "test"

    def __init__(self, key: bytes) -> None:
        self._key = Secret(key)

    def key(self) -> Secret:
        return self._key


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "state")
    assert store.load() is None
    store.save(b"one")
    store.save(b"two")
    assert store.load() == b"two"
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["lock", "state.sealed"]
    assert (tmp_path / "state" / "state.sealed").stat().st_mode & 0o777 == 0o600
    store.close()


def test_second_coordinator_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = FileStore(tmp_path)
    with pytest.raises(StoreError, match="in use by another coordinator"):
        FileStore(tmp_path)
    first.close()
    FileStore(tmp_path).close()


def test_stale_temporary_from_a_crashed_write_is_removed(tmp_path: Path) -> None:
    (tmp_path / ".state.sealed.999.tmp").write_bytes(b"half written")
    store = FileStore(tmp_path)
    assert not (tmp_path / ".state.sealed.999.tmp").exists()
    store.close()


def test_seal_round_trip_and_wrong_platform() -> None:
    a, b = KeySealer(os.urandom(32)), KeySealer(os.urandom(32))
    blob = _seal.seal(b"the state", a)
    assert b"the state" not in blob
    assert _seal.unseal(blob, a, "s") == b"the state"
    with pytest.raises(_seal.UnsealError, match="another platform"):
        _seal.unseal(blob, b, "s")


def test_tampered_or_garbage_sealed_state_is_a_clear_error() -> None:
    a = KeySealer(os.urandom(32))
    blob = bytearray(_seal.seal(b"x" * 100, a))
    i = blob.index(b'"ciphertext": "') + 20
    blob[i] = ord("A") if blob[i] != ord("A") else ord("B")
    with pytest.raises(StoreError, match=r"integrity|corrupt"):
        _seal.unseal(bytes(blob), a, "s")
    with pytest.raises(StoreError, match="corrupt"):
        _seal.unseal(b"\x00garbage", a, "s")
