"""Where the coordinator's sealed state lives.

The file store keeps one file, ``state.sealed``, in the state directory, replaced
atomically: write a temporary file in the same directory, fsync it, rename it over the
old one, fsync the directory. A crash at any point leaves either the old or the new
file, never a torn one. A lock file keeps a second coordinator off the same directory.
Beside it, ``state.journal`` takes sealed records appended (and fsynced) between two
snapshots (``_journal``); saving a snapshot removes it, and a crash before the removal
leaves records that name the old snapshot, which the reader skips.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Protocol

from meshproxy.errors import StoreError


class StoreConflict(StoreError):
    """A compare-and-swap lost: another replica changed the state since it was read."""


class Store(Protocol):
    def load(self) -> bytes | None: ...
    def save(self, blob: bytes) -> None: ...
    def close(self) -> None: ...


class VersionedStore(Protocol):
    """A store replicas share: every write names the revision it replaces."""

    shared: bool  # other writers exist: re-read before every operation

    @property
    def where(self) -> str: ...

    def load_versioned(self) -> tuple[bytes | None, int]: ...
    def save_versioned(self, blob: bytes, expected: int) -> int:
        """Write if the stored revision is still ``expected`` (0: absent), else raise
        ``StoreConflict``; returns the new revision."""
        ...

    def close(self) -> None: ...


class FileStore:
    NAME = "state.sealed"
    JOURNAL = "state.journal"
    shared = False  # the lock makes this process the only writer

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._revision = 0
        self._journal_fd: int | None = None
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"state directory {directory}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreError(
                f"state directory {directory} is in use by another coordinator"
            ) from None
        # Leftovers of a write that crashed before its rename are garbage by construction.
        for stale in directory.glob(f".{self.NAME}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    @property
    def path(self) -> Path:
        return self.directory / self.NAME

    @property
    def where(self) -> str:
        return str(self.path)

    def load_versioned(self) -> tuple[bytes | None, int]:
        blob = self.load()
        self._revision = 0 if blob is None else 1
        return blob, self._revision

    def save_versioned(self, blob: bytes, expected: int) -> int:
        # Sole writer: the revision is bookkeeping only, a mismatch is a bug of the caller.
        self.save(blob)
        self._revision = max(expected, self._revision) + 1
        return self._revision

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {self.path}: {exc.strerror}") from None

    def save(self, blob: bytes) -> None:
        tmp = self.directory / f".{self.NAME}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            self._fsync_directory()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write {self.path}: {exc.strerror}") from None
        # The snapshot holds every record: the journal's frames are stale from now on
        # (and skipped if the removal does not happen).
        self._close_journal()
        with contextlib.suppress(OSError):
            (self.directory / self.JOURNAL).unlink()

    def load_journal(self) -> bytes:
        try:
            return (self.directory / self.JOURNAL).read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise StoreError(
                f"cannot read {self.directory / self.JOURNAL}: {exc.strerror}"
            ) from None

    def append_journal(self, frame: bytes) -> None:
        """Append one frame and fsync it: once this returns, the record is durable."""
        path = self.directory / self.JOURNAL
        try:
            if self._journal_fd is None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
                self._journal_fd = os.open(path, flags, 0o600)
                self._fsync_directory()  # the new file's name is durable too
            view = memoryview(frame)
            while view:
                view = view[os.write(self._journal_fd, view) :]
            os.fsync(self._journal_fd)
        except OSError as exc:
            self._close_journal()
            raise StoreError(f"cannot append to {path}: {exc.strerror}") from None

    def _fsync_directory(self) -> None:
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _close_journal(self) -> None:
        fd, self._journal_fd = self._journal_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        """Idempotent: a second close must not close a descriptor reused meanwhile."""
        self._close_journal()
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
