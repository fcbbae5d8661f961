"""The state journal: counted activations append sealed records between snapshots; a
restart (and recovery) applies them; a torn last record is dropped, anything else that
does not open fails closed; a snapshot makes earlier records stale."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_coordinator_env import NOW, RecoveryHolder, World, package
from test_coordinator_recovery import decrypt

from meshproxy.coordinator import State, _journal
from meshproxy.coordinator._store import FileStore
from meshproxy.errors import PolicyError, StoreError

MAX = 50


def manifest(holders: list[RecoveryHolder] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "Packages": {"app": package()},
        "Marbles": {"m": {"Package": "app", "MaxActivations": MAX}, "free": {"Package": "app"}},
    }
    if holders:
        doc["RecoveryKeys"] = {h.name: h.public_pem for h in holders}
    return doc


def world(tmp: Path, machine: str = "m1") -> World:
    return World(tmp, store=FileStore(tmp / "state"), machine=machine)


def restart(w: World, machine: str = "m1") -> World:
    w.store.close()
    return world(w.tmp, machine)


def activate(w: World, n: int, marble_type: str = "m") -> list[str]:
    uuids = []
    for _ in range(n):
        req = w.request(marble_type)
        w.core.activate(req, now=NOW)
        uuids.append(req.uuid)
    return uuids


def paths(w: World) -> tuple[Path, Path]:
    return w.tmp / "state" / "state.sealed", w.tmp / "state" / "state.journal"


def test_counted_activations_append_records_and_a_restart_applies_them(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.set_manifest(manifest())
    snapshot, journal = paths(w)
    before = snapshot.read_bytes()
    uuids = activate(w, 3)
    activate(w, 2, "free")  # not counted: nothing written
    assert snapshot.read_bytes() == before  # the snapshot was not rewritten
    assert journal.stat().st_mode & 0o777 == 0o600
    sizes = len(journal.read_bytes())
    assert 0 < sizes < 3 * 400  # three small records, not three copies of the state
    for u in uuids:
        assert u.encode() not in journal.read_bytes()  # sealed

    again = restart(w)
    assert again.core.state is State.ACCEPTING_MARBLES
    assert again.core.activation_counts() == {"m": 3}
    assert again.core.persistent.instances == {"m": uuids}
    more = activate(again, 1)  # the first commit of a process writes a snapshot
    assert not journal.exists()
    assert restart(again).core.persistent.instances == {"m": uuids + more}


def test_a_torn_last_record_is_dropped_and_the_ones_before_it_kept(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.set_manifest(manifest())
    uuids = activate(w, 3)
    _, journal = paths(w)
    data = journal.read_bytes()
    journal.write_bytes(data[:-5])  # the process died while appending the third record
    w = restart(w)
    assert w.core.persistent.instances == {"m": uuids[:2]}
    activate(w, 2)  # a snapshot, then a record
    journal.write_bytes(journal.read_bytes() + bytes(64))  # allocated, never written
    assert restart(w).core.activation_counts() == {"m": 4}


def test_a_record_that_does_not_open_before_the_last_fails_closed(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.set_manifest(manifest())
    activate(w, 3)
    _, journal = paths(w)
    data = bytearray(journal.read_bytes())
    data[70] ^= 1  # inside the first record's ciphertext
    journal.write_bytes(bytes(data))
    w.store.close()
    with pytest.raises(StoreError, match="journal is corrupt or was tampered with"):
        world(tmp_path)


def test_records_cannot_be_reordered(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.set_manifest(manifest())
    activate(w, 3)
    _, journal = paths(w)
    data = journal.read_bytes()
    frames = []
    while data:
        n = 4 + int.from_bytes(data[:4], "big")
        frames.append(data[:n])
        data = data[n:]
    assert len(frames) == 3
    journal.write_bytes(frames[1] + frames[0] + frames[2])
    w.store.close()
    with pytest.raises(StoreError, match="journal is corrupt"):
        world(tmp_path)


def test_a_snapshot_makes_earlier_records_stale(tmp_path: Path) -> None:
    """The process died after writing a snapshot and before removing the journal: the
    records are in the snapshot already and must not be applied twice."""
    w = world(tmp_path)
    w.set_manifest(manifest())
    uuids = activate(w, 2)
    _, journal = paths(w)
    stale = journal.read_bytes()
    w.core.transact(lambda s: replace(s, package_svn={"app": 2}))  # not an activation
    assert not journal.exists()
    journal.write_bytes(stale)
    again = restart(w)
    assert again.core.persistent.instances == {"m": uuids}
    assert again.core.persistent.package_svn == {"app": 2}


def test_recovery_on_another_platform_applies_the_journal(tmp_path: Path) -> None:
    holder = RecoveryHolder("key")
    w = world(tmp_path)
    secrets = w.set_manifest(manifest([holder]))
    uuids = activate(w, 2)
    moved = restart(w, machine="elsewhere")
    assert moved.core.state is State.RECOVERY
    remaining, _ = moved.core.recover(*decrypt(holder, secrets), now=NOW)
    assert remaining == 0
    assert moved.core.activation_counts() == {"m": 2}
    assert moved.core.persistent.instances == {"m": uuids}


def test_only_counts_and_appended_uuids_make_a_record(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.set_manifest(manifest())
    s = w.core.persistent
    grown = replace(s, activations={"m": 1}, instances={"m": ["u1"]})
    assert _journal.delta(s, grown) == {"activations": {"m": 1}, "instances": {"m": ["u1"]}}
    assert _journal.delta(grown, replace(grown, instances={"m": ["u2"]})) is None
    assert _journal.delta(s, replace(s, update_log=[])) is None
    assert _journal.delta(s, replace(s, package_svn={"app": 3})) is None


def test_refused_activations_write_nothing(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.set_manifest(manifest())
    snapshot, journal = paths(w)
    activate(w, 2)
    w.core.transact(lambda s: replace(s, activations={"m": MAX}))  # at the limit
    before = snapshot.read_bytes(), journal.read_bytes()
    with pytest.raises(PolicyError, match="MaxActivations"):
        activate(w, 1)
    assert (snapshot.read_bytes(), journal.read_bytes()) == before
    assert restart(w).core.activation_counts() == {"m": MAX}


def test_a_state_edited_in_place_and_committed_again_is_written_in_full(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.set_manifest(manifest())
    s = w.core.persistent
    s.package_svn = {"app": 3}  # not how the core changes state, but must not be lost
    w.sync.commit(s)
    assert restart(w).core.persistent.package_svn == {"app": 3}
