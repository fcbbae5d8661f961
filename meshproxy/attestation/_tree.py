"""The measured tree of the installed meshproxy package: which files, and their digest.

Kept free of ``cryptography`` and the rest of the attestation package: ``meshproxy run``'s
attestation agent starts hashing the package in a thread (``prefetch``) as soon as it
exists, while its main thread loads the modules it attests with. ``hashlib`` and file reads
release the GIL, so on two cores the digest is ready before those imports end.

What is measured is what can load: the source files, the shared objects, the type stubs,
the trust anchors, and the bytecode next to them (``__pycache__/*.pyc`` and any stray
``.pyc``). Python runs a cached ``.pyc`` instead of its source whenever the ``.pyc``'s
header matches the source's timestamp or hash, and that header does not bind the code in
it to the source: someone who can write the package directory could put other code there
under a valid header. So a ``.pyc``'s code is measured too (its header is not: it only
decides between two measured things, the source and the ``.pyc``'s code, and holds the
source's mtime, which differs between two installs of one wheel). Sign after the bytecode
is written (installing a wheel, ``compileall``); meshproxy's own processes write none
(``meshproxy/__init__``), so running does not change what was signed.

The prefetched digest is handed out once, to the next ``package_digest`` of the same
directory, then forgotten: a long-lived process that measures again (signing, a second
check) hashes the files again, so a change made since is seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path
from typing import Protocol

import meshproxy

PACKAGE_DOMAIN = b"meshproxy-package-tree/v2"  # v2: bytecode measured too
PACKAGE_SUFFIXES = (".py", ".so", ".pyi", ".der", ".pyc")
_PYC_HEADER = 16  # magic, flags, then source mtime and size, or source hash

_lock = threading.Lock()
_pending: dict[str, _Prefetch] = {}


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...


def put(h: _Hash, data: bytes) -> None:
    """Length-prefixed: no two sequences of ``put`` calls feed the same bytes."""
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def package_dir() -> Path:
    """The installed meshproxy package: the directory this code was loaded from."""
    return Path(meshproxy.__file__).parent


def package_files(root: Path) -> list[str]:
    """The package's measured files as sorted relative POSIX paths: regular files (or links
    to them) whose suffix is one of PACKAGE_SUFFIXES, ``__pycache__`` included, found
    without entering linked directories (what ``root.rglob("*")`` and ``is_file`` select)."""
    out: list[str] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(str(root), rel)) as entries:
            for entry in entries:
                name = entry.name
                sub = f"{rel}/{name}" if rel else name
                if entry.is_dir():
                    if not entry.is_symlink():
                        pending.append(sub)
                elif _measured_name(name) and entry.is_file():
                    out.append(sub)
    out.sort()
    return out


def _measured_name(name: str) -> bool:
    """pathlib's ``suffix in PACKAGE_SUFFIXES``: the last dot, not the first character."""
    dot = name.rfind(".")
    return 0 < dot < len(name) - 1 and name[dot:] in PACKAGE_SUFFIXES


def _digest_now(root: Path) -> str:
    # With str paths and os.scandir this takes a few ms, where pathlib's rglob took ~15 ms.
    base = str(root)
    h = hashlib.sha256()
    put(h, PACKAGE_DOMAIN)
    for rel in package_files(root):
        with open(os.path.join(base, rel), "rb") as f:
            data = f.read()
        if rel.endswith(".pyc"):
            data = data[_PYC_HEADER:]  # the code; the header only says when it is used
        put(h, rel.encode())
        put(h, hashlib.sha256(data).digest())
    return h.hexdigest()


class _Prefetch:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.digest: str | None = None
        self.thread = threading.Thread(target=self._run, name="measure-package", daemon=True)

    def _run(self) -> None:
        # A file that cannot be read leaves no digest: the reader hashes again and reports.
        with contextlib.suppress(OSError):
            self.digest = _digest_now(self.root)


def prefetch(root: Path) -> None:
    """Start hashing ``root`` in a thread; the next ``package_digest(root)`` waits for it."""
    job = _Prefetch(Path(root))
    with _lock:
        _pending[str(job.root)] = job
    job.thread.start()


def package_digest(root: Path) -> str:
    """SHA-256 over the package's measured files (their paths and contents), hex."""
    with _lock:
        job = _pending.pop(str(Path(root)), None)
    if job is not None:
        job.thread.join()
        if job.digest is not None:
            return job.digest
    return _digest_now(Path(root))  # no prefetch, or it failed: measure here (and raise)
