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
under a valid header. So a ``.pyc``'s code is measured too, with whether this interpreter
would run it for its source now (``_pyc_used``: what its header decides; a stale ``.pyc``
of old code cannot be made to run by rewriting its header). The header itself is not
measured: it holds the source's mtime, which differs between two installs of one wheel.
Sign after the bytecode is written (installing a wheel, ``compileall``); meshproxy's own
processes write none (``meshproxy/__init__``), so running does not change what was
signed.

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
from meshproxy._pipes import read_to_end

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
    files = package_files(root)
    contents = {}
    for rel in files:
        with open(os.path.join(base, rel), "rb") as f:
            contents[rel] = f.read()
    h = hashlib.sha256()
    put(h, PACKAGE_DOMAIN)
    for rel in files:
        data = contents[rel]
        if rel.endswith(".pyc"):  # the code, and whether it runs (not the header's mtime)
            used = _pyc_used(base, rel, data, contents)
            data = (b"\x01" if used else b"\x00") + data[_PYC_HEADER:]
        put(h, rel.encode())
        put(h, hashlib.sha256(data).digest())
    return h.hexdigest()


def _pyc_used(base: str, rel: str, data: bytes, contents: dict[str, bytes]) -> bool:
    """Whether this interpreter runs this ``.pyc``'s code when its module is imported:
    what ``importlib``'s SourceFileLoader decides from the header (a ``__pycache__``
    entry is used only for its source, and only while its header matches that source);
    a ``.pyc`` outside ``__pycache__`` loads on its own when imported."""
    import _imp
    import importlib.util

    if len(data) < _PYC_HEADER or data[:4] != importlib.util.MAGIC_NUMBER:
        return False
    if "__pycache__" not in rel.split("/"):
        return True
    try:
        source = importlib.util.source_from_cache(os.path.join(base, rel))
        st = os.stat(source)
    except (ValueError, OSError):
        return False  # not a name import looks up, or no source: never loaded
    flags = int.from_bytes(data[4:8], "little")
    if flags & ~0b11:
        return False
    if flags & 0b1:  # hash-based
        checked = flags & 0b10 != 0
        mode = getattr(_imp, "check_hash_based_pycs", "default")
        if mode == "never" or (not checked and mode != "always"):
            return True
        code = contents.get(os.path.relpath(source, base).replace(os.sep, "/"))
        if code is None:
            try:
                with open(source, "rb") as f:
                    code = f.read()
            except OSError:
                return False
        return importlib.util.source_hash(code) == data[8:16]
    mtime = int.from_bytes(data[8:12], "little")
    size = int.from_bytes(data[12:16], "little")
    return mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size & 0xFFFFFFFF


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
        digest = read_to_end(fd).decode("ascii", "replace")
        if len(digest) == 64:
            return digest
    return _digest_now(Path(root))  # none sent (the proxy could not read): measure here
