"""The ends of the pipes between ``meshproxy run`` and its attestation agent: each is
written or read whole, once, and closed (runtime._agent, attestation._tree)."""

from __future__ import annotations

import contextlib
import os


def read_to_end(fd: int) -> bytes:
    """Everything until the writer closes ``fd``; ``fd`` is closed."""
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd`` and close it (a reader that is gone already reads none)."""
    view = memoryview(data)
    try:
        with contextlib.suppress(BrokenPipeError):
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
