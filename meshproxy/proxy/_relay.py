"""Byte relay between two streams, and the bookkeeping of open connections.

A relay runs both directions at once. Each direction reads a chunk, writes it and waits
for the writer to drain before reading again, so at most a chunk plus the transports'
bounded buffers sit in memory. EOF in one direction becomes a half-close of the other
stream (``write_eof``: close_notify on TLS, ``shutdown(SHUT_WR)`` on a Unix socket) and
the opposite direction keeps running. A reset or TLS error in either direction aborts
both streams; its reason goes into the connection's close log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from meshproxy.errors import ConfigError
from meshproxy.tls import CHUNK, describe_error

log = logging.getLogger("meshproxy.proxy")

APP_CONNECT_TIMEOUT = 5.0  # the app's accept backlog full for this long: refuse


class ByteStream(Protocol):
    """What the relay needs from either side of a connection."""

    async def read(self) -> bytes: ...  # b"" at EOF
    async def write(self, data: bytes) -> None: ...  # returns once drained enough
    async def write_eof(self) -> None: ...
    def abort(self) -> None: ...
    async def aclose(self) -> None: ...


class UnixStream:
    """The app's side: an asyncio stream pair on a Unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        return await self._reader.read(CHUNK)

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def write_eof(self) -> None:
        if not self._writer.is_closing() and self._writer.can_write_eof():
            self._writer.write_eof()

    def abort(self) -> None:
        self._writer.transport.abort()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


@dataclass
class RelayResult:
    """Bytes moved in each direction, and why the connection ended if it was not EOF."""

    a_to_b: int = 0
    b_to_a: int = 0
    error: str | None = None


async def relay(a: ByteStream, b: ByteStream) -> RelayResult:
    """Copy both ways until both directions reached EOF or one failed; closes both."""
    result = RelayResult()

    async def pump(src: ByteStream, dst: ByteStream, forward: bool) -> None:
        while data := await src.read():
            await dst.write(data)
            if forward:
                result.a_to_b += len(data)
            else:
                result.b_to_a += len(data)
        await dst.write_eof()

    tasks = [asyncio.ensure_future(pump(a, b, True)), asyncio.ensure_future(pump(b, a, False))]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    except OSError as exc:
        result.error = describe_error(exc)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if result.error is not None or any(not t.done() or t.cancelled() for t in tasks):
            a.abort()
            b.abort()
    await asyncio.gather(a.aclose(), b.aclose())
    return result


class ConnectionSet:
    """The tasks serving open connections, so shutdown can wait for them, then end them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a peer's doing: say so with the traceback (no secrets in frames'
            # reprs: keys are Secret and identities carry none).
            log.error("connection handler failed", exc_info=task.exception(),
                      extra={"event": "connection.internal_error"})  # fmt: skip

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for open connections, then cancel the rest.

        Returns how many had to be cancelled.
        """
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)


def bind_unix_socket(path: Path) -> socket.socket:
    """A listening Unix socket whose file is 0600 from the moment it exists."""
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"{path}: exists and is not a socket; refusing to replace it")
        path.unlink()  # a stale socket from an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux the socket file takes the mode of the socket inode: set it before bind
        # so there is no window in which the file is group- or world-accessible.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"{path}: cannot listen: {exc.strerror or exc}") from None
    return sock


async def connect_unix(path: Path, timeout: float = APP_CONNECT_TIMEOUT) -> socket.socket:
    """A connected non-blocking Unix socket to the app, for either backend.

    Not ``loop.sock_connect``/``open_unix_connection``: on AF_UNIX a full accept backlog
    fails a non-blocking connect() with EAGAIN (never EINPROGRESS), which asyncio raises
    as an error (and uvloop's sock_connect reports as success on a socket that is not
    connected). A burst larger than the app's backlog is not "the app is not listening":
    retry the way a blocking connect() would wait, for at most ``timeout`` seconds.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        delay, waited = 0.001, 0.0
        while True:
            try:
                sock.connect(str(path))
                return sock
            except BlockingIOError:
                if waited >= timeout:
                    raise OSError(errno.EAGAIN, "the app's accept backlog stays full") from None
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.05)
    except BaseException:
        sock.close()
        raise
