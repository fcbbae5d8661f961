"""The state journal: counted activations appended as small sealed records (no I/O here).

Theory of operation. A commit used to re-serialize and re-seal the whole state, so a
group commit of activations cost time proportional to everything the state holds
(every counted marble's UUID, certificates, secrets, the update log). Activations change
only two fields, ``activations`` and ``instances`` (UUIDs appended). When a commit's state
differs from the last committed one in nothing else, the file store appends one record to
``state.journal`` instead: the new counts and the appended UUIDs, sealed with AES-256-GCM
under the state's data key (the DEK, so the recovery keys open it too), fsynced before
any activation of the batch is answered. Any other change writes a full snapshot, as
before, and so does the first commit of a process and every ``SNAPSHOT_EVERY``-th.

A frame: length (4 bytes, big-endian) || base (32) || sequence (8) || nonce (12) ||
ciphertext. ``base`` is SHA-256 of the snapshot blob the record extends and ``sequence``
counts from 0 after it; both are the AEAD's associated data, so a record cannot be moved
to another snapshot or position. Reading: frames of another base are stale (a snapshot
was written and the process died before it removed the journal) and skipped; the
frames of this base must follow each other 0, 1, 2 ... and open; the LAST frame may be
incomplete or fail to open (the process died while appending it; no activation it
holds was answered) and is dropped; any other failure is corruption and fails closed.
As with the snapshot alone, the host can roll the state back to an older complete
version (truncate the journal, restore an older file) but cannot forge or reorder one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, fields, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshproxy._redact import Secret
from meshproxy.coordinator._persist import PersistentState
from meshproxy.errors import StoreError

SNAPSHOT_EVERY = 1024  # records after one snapshot before the next commit writes a new one
_HEAD = struct.Struct(">I32sQ12s")  # length, base, sequence, nonce
_AAD = b"meshproxy state journal v1"
_JOURNALED = frozenset({"activations", "instances"})  # what a record may change


def base_of(snapshot: bytes) -> bytes:
    return hashlib.sha256(snapshot).digest()


def delta(old: PersistentState, new: PersistentState) -> dict[str, Any] | None:
    """What a record must hold to turn ``old`` into ``new``; None if a record cannot
    (anything but counts and appended UUIDs changed): then a snapshot is written."""
    for f in fields(PersistentState):
        if f.name not in _JOURNALED and getattr(old, f.name) is not getattr(new, f.name):
            return None
    added: dict[str, list[str]] = {}
    if not set(old.instances) <= set(new.instances):
        return None
    for marble_type, uuids in new.instances.items():
        before = old.instances.get(marble_type, [])
        if uuids[: len(before)] != before:
            return None
        if len(uuids) > len(before):
            added[marble_type] = uuids[len(before) :]
    return {"activations": dict(new.activations), "instances": added}


def frame(dek: Secret, base: bytes, sequence: int, record: dict[str, Any]) -> bytes:
    nonce = os.urandom(12)
    body = json.dumps(record, sort_keys=True).encode()
    length = _HEAD.size - 4 + len(body) + 16
    head = _HEAD.pack(length, base, sequence, nonce)
    return head + AESGCM(dek.reveal()).encrypt(nonce, body, _AAD + head[4:-12])


@dataclass(frozen=True)
class Replayed:
    state: PersistentState
    records: int  # applied
    dropped_tail: bool  # an incomplete last record was dropped


def replay(state: PersistentState, snapshot: bytes, journal: bytes, where: str) -> Replayed:
    """``state`` (opened from ``snapshot``) with the journal's records applied."""
    base, expected, offset, end = base_of(snapshot), 0, 0, len(journal)
    aead = AESGCM(state.dek.reveal())
    while offset < end:
        if offset + _HEAD.size > end:
            return Replayed(state, expected, True)  # a torn header
        length, frame_base, sequence, nonce = _HEAD.unpack_from(journal, offset)
        if length == 0 and not any(journal[offset:]):
            return Replayed(state, expected, True)  # zeros: space allocated, never written
        stop = offset + 4 + length
        if stop > end:
            return Replayed(state, expected, True)  # torn: died while appending it
        if length < _HEAD.size - 4 + 16:
            raise StoreError(f"{where}: the state journal is corrupt (bad frame at {offset})")
        if frame_base != base:
            if expected:  # a stale frame after this snapshot's own: not our writing order
                raise StoreError(f"{where}: the state journal is corrupt (mixed snapshots)")
            offset = stop  # written before the snapshot, which already holds it
            continue
        head = journal[offset : offset + _HEAD.size]
        try:
            if sequence != expected:
                raise ValueError("sequence")
            body = aead.decrypt(nonce, journal[offset + _HEAD.size : stop], _AAD + head[4:-12])
            state = apply(state, json.loads(body))
        except (InvalidTag, ValueError, TypeError, KeyError, AttributeError):
            if stop == end:  # the record being written when the process died: unanswered
                return Replayed(state, expected, True)
            raise StoreError(
                f"{where}: the state journal is corrupt or was tampered with (record {expected})"
            ) from None
        expected += 1
        offset = stop
    return Replayed(state, expected, False)


def apply(state: PersistentState, record: dict[str, Any]) -> PersistentState:
    activations = {str(k): int(v) for k, v in record["activations"].items()}
    instances = {k: list(v) for k, v in state.instances.items()}
    for marble_type, added in record["instances"].items():
        if not isinstance(added, list) or not all(isinstance(u, str) for u in added):
            raise ValueError("instances")
        instances.setdefault(str(marble_type), []).extend(added)
    return replace(state, activations=activations, instances=instances)
