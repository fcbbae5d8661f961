"""Bringing a coordinator's state up: store + vault -> loaded, created, joined, or recovery.

Theory of operation: the state is read from the store. Nothing there: a fresh root CA is
created and written with a compare-and-swap against "absent" (a replica that loses that
race loads the winner's state instead). Something there that this platform can open:
loaded. Something it cannot open: with an etcd store, the state key is asked of the peer
replicas registered in etcd (``_replica``); without one, or when no peer gives it, the
coordinator enters recovery mode with a temporary root, the sealed state left untouched.

``StateSync`` is the one path between the core and the store: ``commit`` seals and writes
against the revision last read, ``refresh`` re-reads when the store is shared. With the
file store, a commit that only counts activations appends a sealed record to the journal
instead of rewriting the whole state (``_journal``); ``load`` (and recovery, through
``open_with_data_key``) applies the journal to the snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from meshproxy._redact import Secret
from meshproxy.coordinator import _journal
from meshproxy.coordinator._persist import PersistentState
from meshproxy.coordinator._recovery import RecoveryInfo
from meshproxy.coordinator._seal import UnsealError
from meshproxy.coordinator._state import Event, State, advance
from meshproxy.coordinator._store import FileStore, StoreConflict, VersionedStore
from meshproxy.coordinator._vault import Vault
from meshproxy.errors import StoreError

log = logging.getLogger("meshproxy.coordinator")

KeySource = Callable[[], bool]  # tries to get the state key from a peer into the vault


@dataclass(frozen=True)
class _Tail:
    """Where the next journal record goes: after snapshot ``base``, number ``sequence``,
    extending ``state`` (the state last committed)."""

    base: bytes
    sequence: int
    state: PersistentState


class StateSync:
    def __init__(self, store: VersionedStore, vault: Vault) -> None:
        self.store = store
        self.vault = vault
        self.revision = 0
        self.key_source: KeySource | None = None
        # The file store takes journal records between snapshots; etcd (replicas) does not.
        self._journal_store = store if isinstance(store, FileStore) else None
        self._tail: _Tail | None = None  # None: the next commit writes a snapshot
        self._locked_blob: bytes | None = None  # the snapshot recovery mode waits to open

    def __repr__(self) -> str:
        return f"<StateSync {self.store.where} revision={self.revision}>"

    def load(self) -> PersistentState | None:
        """The stored state, None if there is none; ``UnsealError`` if it cannot be opened."""
        blob, self.revision = self.store.load_versioned()
        if blob is None:
            return None
        return self._replay(blob, self._open(blob))

    def _open(self, blob: bytes) -> PersistentState:
        try:
            return self.vault.open(blob)
        except UnsealError:
            if self.key_source is None or not self.key_source():
                self._locked_blob = blob
                raise
            return self.vault.open(blob)

    def _replay(self, blob: bytes, state: PersistentState) -> PersistentState:
        if self._journal_store is None:
            return state
        journal = self._journal_store.load_journal()
        if not journal:
            return state
        replayed = _journal.replay(state, blob, journal, self.store.where)
        log.info(
            "state journal applied",
            extra={"records": replayed.records, "dropped_torn_record": replayed.dropped_tail},
        )
        return replayed.state

    # -- recovery mode (``core.LockedState``): the vault opens, the journal is applied ---------
    def locked_recovery(self) -> RecoveryInfo | None:
        return self.vault.locked_recovery()

    def open_with_data_key(self, dek: Secret) -> PersistentState:
        state = self.vault.open_with_data_key(dek)
        if self._locked_blob is None:
            return state
        return self._replay(self._locked_blob, state)

    def commit(self, state: PersistentState) -> None:
        if state.state is State.RECOVERY:
            raise StoreError("refusing to write a recovery-mode placeholder over sealed state")
        tail, self._tail = self._tail, None  # a failed write is followed by a snapshot
        # Changes are new objects (``dataclasses.replace``), never edits in place: the same
        # object committed again cannot say what changed, so it is written in full.
        if (
            self._journal_store is not None
            and tail is not None
            and state is not tail.state
            and tail.sequence < _journal.SNAPSHOT_EVERY
        ):
            record = _journal.delta(tail.state, state)
            if record is not None:
                if record["activations"] == tail.state.activations and not record["instances"]:
                    self._tail = _Tail(tail.base, tail.sequence, state)  # nothing to write
                    return
                frame = _journal.frame(state.dek, tail.base, tail.sequence, record)
                self._journal_store.append_journal(frame)
                self._tail = _Tail(tail.base, tail.sequence + 1, state)
                return
        blob = self.vault.seal(state)
        self.revision = self.store.save_versioned(blob, self.revision)
        if self._journal_store is not None:
            self._tail = _Tail(_journal.base_of(blob), 0, state)

    def refresh(self) -> PersistentState | None:
        if not self.store.shared:
            return None
        blob, revision = self.store.load_versioned()
        if revision == self.revision or blob is None:
            return None
        try:
            state = self._open(blob)
        except UnsealError as exc:
            raise StoreError(
                f"this replica lost access to the shared state (it was recovered or re-keyed "
                f"elsewhere, and no peer gave the new key): {exc}"
            ) from None
        self.revision = revision
        return state


@dataclass
class Loaded:
    persistent: PersistentState
    locked: bool  # recovery mode: the sealed state exists but cannot be opened
    created: bool


def load_or_create(
    sync: StateSync, fresh: Callable[[], PersistentState], *, attempts: int = 5
) -> Loaded:
    for _ in range(attempts):
        try:
            persistent = sync.load()
        except UnsealError as exc:
            log.error("cannot unseal state; entering recovery mode", extra={"reason": str(exc)})
            temporary = fresh()
            temporary.state = advance(State.UNINITIALIZED, Event.UNSEAL_FAILED)
            return Loaded(temporary, locked=True, created=False)
        if persistent is not None:
            persistent.state = (
                advance(State.UNINITIALIZED, Event.LOADED)
                if persistent.manifest_raw is not None
                else State.ACCEPTING_MANIFEST
            )
            if sync.vault.needs_registration():
                register(sync, persistent)
            log.info("loaded sealed state", extra={"state": persistent.state.name})
            return Loaded(persistent, locked=False, created=False)
        created = fresh()
        try:
            sync.commit(created)
        except StoreConflict:
            continue  # another replica created the state first: load theirs
        log.info("created a new root CA", extra={"store": sync.store.where})
        return Loaded(created, locked=False, created=True)
    raise StoreError(f"{sync.store.where}: the state keeps changing while starting; retry")


def register(sync: StateSync, persistent: PersistentState) -> None:
    """Seal the state key for this platform too, so it opens here after a restart."""
    for _ in range(5):
        try:
            sync.commit(persistent)
            return
        except StoreConflict:
            fresh = sync.load()
            if fresh is None:
                return
            fresh.state = persistent.state
            persistent = fresh
    log.warning("could not record this platform's sealed state key; will ask a peer again")
