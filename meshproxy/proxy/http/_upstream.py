"""Where an HTTP listener sends requests: the app's Unix socket, or an upstream marble.

An upstream belongs to one downstream connection, which keeps apps and callers apart:
HTTP/2 (h2c to the app, h2 to a marble) multiplexes that connection's requests on one
upstream connection, opened on the first request and replaced when it closes or says
GOAWAY; HTTP/1.1 uses a pool of connections (``H1Pool``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

from meshproxy.errors import MeshError
from meshproxy.pki import PeerIdentity, check_peer
from meshproxy.proxy._relay import ByteStream, UnixStream
from meshproxy.proxy.http._h1 import H1Pool
from meshproxy.proxy.http._h2 import H2Client, H2ClientStream
from meshproxy.proxy.http._model import HttpLimits, RequestHead, UpstreamUnavailable
from meshproxy.tls import connect

log = logging.getLogger("meshproxy.proxy.http")

Dial = Callable[[], Awaitable[ByteStream]]


def unix_dialer(path: Path, timeout: float = 1.0) -> Dial:
    """Connect to the app; a full listen backlog (EAGAIN) is retried for ``timeout``."""

    async def dial() -> ByteStream:
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + timeout, 0.001
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path))
            except BlockingIOError:
                if loop.time() + delay > deadline:
                    raise UpstreamUnavailable(
                        f"app on {path} is not accepting connections (its backlog is full)"
                    ) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            except OSError as exc:
                raise UpstreamUnavailable(
                    f"app is not listening on {path}: {exc.strerror or exc}"
                ) from None
            return UnixStream(reader, writer)

    return dial


def tls_dialer(
    ctx: ssl.SSLContext,
    host: str,
    port: int,
    *,
    sni: str | None,
    peer: str,
    trust_domain: str,
    timeout: float,
    on_peer: Callable[[PeerIdentity], None] | None = None,
) -> Dial:
    """mTLS to an upstream marble that must prove marble type ``peer``."""

    async def dial() -> ByteStream:
        try:
            stream = await connect(ctx, host, port, sni=sni, timeout=timeout)
        except MeshError as exc:
            raise UpstreamUnavailable(str(exc)) from None
        try:
            ident = check_peer(
                stream.peer_certificate() or b"",
                trust_domain=trust_domain,
                allowed_types=(peer,),
                role="server",
            )
        except MeshError as exc:
            stream.abort()
            fields = {"reason": str(exc), "upstream": f"{host}:{port}"}
            log.warning("upstream refused", extra={"event": "outbound.refused", **fields})
            raise UpstreamUnavailable(str(exc)) from None
        if on_peer is not None:
            on_peer(ident)
        return stream

    return dial


class H2Upstream:
    def __init__(self, dial: Dial, limits: HttpLimits) -> None:
        self._dial = dial
        self._limits = limits
        self._conn: H2Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._old: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    async def open(self, head: RequestHead) -> H2ClientStream:
        async with self._lock:
            if self._conn is None or not self._conn.usable:
                if self._task is not None:
                    self._old.add(self._task)  # it finishes its streams, then ends
                    self._task.add_done_callback(self._old.discard)
                self._conn = H2Client(await self._dial(), self._limits)
                self._task = asyncio.get_running_loop().create_task(self._conn.run())
            conn = self._conn
        return await conn.open_stream(head)

    def release(self) -> None:
        """Close the connection now (nobody uses it); the next ``open`` dials again."""
        if self._task is not None:
            self._task.cancel()
            self._old.add(self._task)
            self._task.add_done_callback(self._old.discard)
        self._conn = self._task = None

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._old) if t is not None]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


def make_upstream(app_protocol: str, dial: Dial, limits: HttpLimits) -> H2Upstream | H1Pool:
    """``h2c``/``h2``: one multiplexed connection; ``http1``: a connection pool."""
    if app_protocol in ("h2c", "h2"):
        return H2Upstream(dial, limits)
    return H1Pool(dial, limits)
