"""The measured tree of the installed meshproxy package: which files, and their digest.

Kept free of ``cryptography`` and the rest of the attestation package: ``meshproxy run``
measures the package in the proxy (``send_digest``) right after forking its attestation
agent, which loads the modules it attests with meanwhile and reads the digest when it
checks the measurement (``expect_digest``); on two cores both happen at once.

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

The digest sent is used once, by the next ``package_digest`` of that directory: a process
that measures again (signing, a second check) hashes the files again, so a change made
since is seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Protocol

import meshproxy

PACKAGE_DOMAIN = b"meshproxy-package-tree/v2"  # v2: bytecode measured too
PACKAGE_SUFFIXES = (".py", ".so", ".pyi", ".der", ".pyc")
_PYC_HEADER = 16  # magic, flags, then source mtime and size, or source hash

_pending: dict[str, int] = {}  # root -> the pipe its digest comes on (expect_digest)


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


# -- measured by the proxy while its agent loads its modules ------------------------------
def send_digest(root: Path, fd: int) -> None:
    """Hash ``root`` and write the hex digest to ``fd``, then close it.

    ``meshproxy run`` forks its attestation agent, then measures here, in the proxy,
    while the agent loads cryptography and the attestation modules (a thread of the
    agent would hardly run: every read and open hands the GIL back to imports that keep
    it for the whole switch interval). Both processes are the same code in the same
    enclave, the pipe is theirs alone; a file that cannot be read sends nothing, and the
    agent measures itself and reports it."""
    try:
        digest = _digest_now(Path(root))
    except OSError:
        digest = ""
    # 64 bytes: one atomic write to a pipe. An agent that is gone already (it failed;
    # the proxy learns that from its answer) does not read it.
    with contextlib.suppress(BrokenPipeError):
        os.write(fd, digest.encode())
    os.close(fd)


def expect_digest(root: Path, fd: int) -> None:
    """The next ``package_digest(root)`` reads ``send_digest``'s answer from ``fd``."""
    _pending[str(Path(root))] = fd


def package_digest(root: Path) -> str:
    """SHA-256 over the package's measured files (their paths and contents), hex."""
    fd = _pending.pop(str(Path(root)), None)
    if fd is not None:
        chunks = []
        try:
            while chunk := os.read(fd, 128):
                chunks.append(chunk)
        finally:
            os.close(fd)
        digest = b"".join(chunks).decode("ascii", "replace")
        if len(digest) == 64:
            return digest
    return _digest_now(Path(root))  # none sent (the proxy could not read): measure here
