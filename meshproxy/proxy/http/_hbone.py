"""HBONE: TCP streams as HTTP/2 CONNECT streams over mTLS (Istio ambient's tunnel).

Inbound (``protocol: hbone``): each CONNECT stream of a verified peer becomes one
connection to the app's Unix socket, as a ``tcp`` listener would make, optionally
prefixed by the PROXY v2 identity header. Replies follow ztunnel: 400 for anything but
CONNECT or for an authority that is not ``host:port``, 401 for a caller the listener
does not allow, 503 when the app is not listening, 200 and then the bytes. As ztunnel
does, the TLS handshake takes any peer whose chain verifies and that is of our trust
domain (``hbone_caller``); whether its identity may call is answered per CONNECT. A
certificate not under our CA still fails the handshake. ``Forwarded``, ``baggage``,
``traceparent`` and ``x-forwarded-network`` are tolerated and not passed on.

Outbound (``protocol: hbone``): each app connection on the Unix socket becomes one
CONNECT stream with ``:authority`` = the upstream ``host:port``, multiplexed with the
listener's other connections on one mTLS HTTP/2 connection (ALPN ``h2``) to the
upstream marble, at most ``max_concurrent_streams`` (100) streams each.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from pathlib import Path

from meshproxy.errors import PKIError
from meshproxy.pki import CertNames, PeerIdentity, identity_of
from meshproxy.proxy import _proxyproto
from meshproxy.proxy._relay import ByteStream
from meshproxy.proxy.http._forward import Observer, ServerExchange, local_reply
from meshproxy.proxy.http._model import (
    CANCEL,
    CONNECT_ERROR,
    Body,
    Chunk,
    RequestHead,
    ResponseHead,
    StreamReset,
    UpstreamUnavailable,
)
from meshproxy.proxy.http._upstream import H2Upstream, unix_dialer

log = logging.getLogger("meshproxy.proxy.http")
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}$")


def parse_authority(authority: bytes) -> tuple[str, int] | None:
    """``ip:port``, ``[ipv6]:port`` or ``host:port``; None when it is none of them."""
    text = authority.decode("ascii", "replace")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port)
        except ValueError:
            return None
    if not _HOST.match(host):
        return None
    return host, int(port)


def hbone_caller(names: CertNames, trust_domain: str) -> PeerIdentity | None:
    """The identity of a chain-verified HBONE caller if it is of ``trust_domain``
    (it then gets 401 on its CONNECTs when not allowed); None: refuse the connection."""
    try:
        ident = identity_of(names)
    except PKIError:
        return None
    return ident if ident.trust_domain == trust_domain else None


async def serve_connect(
    ex: ServerExchange,
    *,
    app_socket: Path,
    peer: PeerIdentity | None,
    source: str | None,
    destination: tuple[str, int] | None,
    proxy_protocol: bool,
    observer: Observer,
) -> str | None:
    """One inbound CONNECT stream; returns why it failed, or None."""
    head = ex.request
    if ex.protocol != "h2" or head.method != b"CONNECT" or head.protocol:
        await local_reply(ex, 400, 12, "HBONE accepts only HTTP/2 CONNECT", observer)
        return "not a CONNECT"
    target = parse_authority(head.authority)
    if target is None:
        await local_reply(ex, 400, 3, f"bad CONNECT authority {head.authority!r}", observer)
        return "bad authority"
    try:
        app = await unix_dialer(app_socket)()
    except UpstreamUnavailable as exc:
        await local_reply(ex, 503, 14, str(exc), observer)
        return str(exc)
    try:
        if proxy_protocol:
            await app.write(_proxyproto.for_peer(peer, source, destination))
        await ex.send_head(ResponseHead(200, []), end_stream=False)
        observer.responded(200)
        await _tunnel(ex.body, app, ex)
        observer.finished(200, None, ok=True)
        return None
    except (StreamReset, OSError) as exc:
        app.abort()
        if not ex.gone:
            ex.reset(CONNECT_ERROR)
        observer.finished(200, None, ok=False)
        return f"tunnel broke: {exc}"
    finally:
        ex.body.discard()
        await app.aclose()


async def _tunnel(body: Body, app: ByteStream, ex: ServerExchange) -> None:
    async def up() -> None:
        while (item := await body.next()) is not None:
            if isinstance(item, Chunk):
                await app.write(item.data)
                item.release()
        await app.write_eof()

    async def down() -> None:
        while data := await app.read():
            await ex.send_data(data)
        await ex.end()

    await _both(up(), down())


async def _both(*coros: object) -> None:
    """Run both directions; the first failure cancels the other and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]  # type: ignore[call-overload]
    try:
        for task in asyncio.as_completed(tasks):
            await task
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class HboneOutbound:
    """The outbound side: app connections as CONNECT streams on shared connections."""

    def __init__(self, upstream: H2Upstream, authority: str) -> None:
        self._upstream = upstream
        self._authority = authority.encode()
        self._active = 0

    async def serve(self, app: ByteStream) -> str | None:
        # The connection lives while tunnels use it: idle, it is closed (ztunnel releases
        # unused pool connections too), so nothing outlives the listener.
        self._active += 1
        try:
            return await self._serve(app)
        finally:
            self._active -= 1
            if not self._active:
                self._upstream.release()

    async def _serve(self, app: ByteStream) -> str | None:
        head = RequestHead(b"CONNECT", b"", self._authority, b"", [])
        try:
            stream = await self._upstream.open(head)
        except (UpstreamUnavailable, StreamReset) as exc:
            await app.aclose()
            return f"upstream unavailable: {exc}"
        try:
            response, body = await stream.response()
            if response.status != 200:
                return f"upstream answered CONNECT with {response.status}"

            async def up() -> None:
                while data := await app.read():
                    await stream.send_data(data)
                await stream.end()

            async def down() -> None:
                while (item := await body.next()) is not None:
                    if isinstance(item, Chunk):
                        await app.write(item.data)
                        item.release()
                await app.write_eof()

            await _both(up(), down())
            return None
        except (StreamReset, OSError) as exc:
            stream.reset(CANCEL)
            app.abort()
            return f"tunnel broke: {exc}"
        finally:
            stream.close()
            with contextlib.suppress(OSError):
                await app.aclose()

    async def close(self) -> None:
        await self._upstream.close()
