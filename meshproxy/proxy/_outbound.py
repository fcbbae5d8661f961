"""Outbound: the app's plaintext on a Unix socket -> mTLS to an upstream marble.

For each app connection the upstream is dialled at once and the ClientHello written
immediately (meshes sniff first bytes; a silent client waits out their protocol
detection). SNI is the configured service name. After the handshake the server must
prove the configured marble type (``pki.check_peer``); otherwise the app's connection is
closed and the reason logged. The socket file is 0600 inside the 0700 workdir.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from meshproxy.errors import MeshError
from meshproxy.pki import check_peer, spiffe_id
from meshproxy.proxy._metrics import ProxyMetrics
from meshproxy.proxy._relay import ConnectionSet, UnixStream, bind_unix_socket, relay
from meshproxy.tls import connect

if TYPE_CHECKING:  # the HTTP layer (h2, h11) is loaded only when a listener speaks HTTP
    from meshproxy.proxy.http import OutboundHttp

log = logging.getLogger("meshproxy.proxy.outbound")


@dataclass(frozen=True)
class OutboundSpec:
    name: str
    socket_path: Path
    host: str
    port: int
    sni: str | None
    peer: str  # the marble type the server must prove
    trust_domain: str
    connect_timeout: float = 10.0
    http: OutboundHttp | None = None  # protocol: http (None: tcp)


class OutboundListener:
    def __init__(
        self,
        spec: OutboundSpec,
        ctx: ssl.SSLContext,
        connections: ConnectionSet,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.spec = spec
        self._ctx = ctx
        self._connections = connections
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    def set_context(
        self, ctx: ssl.SSLContext, http: Mapping[str, ssl.SSLContext] | None = None
    ) -> None:
        """Rotation: new connections use ``ctx`` (``http``: the HTTP layer's contexts per
        ALPN protocol); open ones, and pooled HTTP/2 connections, keep theirs."""
        self._ctx = ctx
        if http is not None and self.spec.http is not None:
            self.spec = replace(self.spec, http=replace(self.spec.http, contexts=http))

    async def start(self) -> Path:
        sock = bind_unix_socket(self.spec.socket_path)
        self._server = await asyncio.start_unix_server(self._accepted, sock=sock)
        return self.spec.socket_path

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(FileNotFoundError):
                self.spec.socket_path.unlink()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.spawn(self._serve(UnixStream(reader, writer)))

    async def _serve(self, app: UnixStream) -> None:
        try:
            await self._serve_checked(app)
        except asyncio.CancelledError:  # shutdown ended the grace period
            app.abort()
            raise

    async def _serve_checked(self, app: UnixStream) -> None:
        spec = self.spec
        upstream = f"{spec.host}:{spec.port}"
        fields: dict[str, object] = {"listener": spec.name, "upstream": upstream}
        peer_id = spiffe_id(spec.trust_domain, spec.peer)
        if spec.http is not None:
            from meshproxy.proxy.http import serve_outbound_http

            await serve_outbound_http(
                app, listener=spec.name, host=spec.host, port=spec.port, sni=spec.sni,
                peer=spec.peer, peer_id=peer_id, trust_domain=spec.trust_domain,
                connect_timeout=spec.connect_timeout, settings=spec.http, metrics=self._metrics,
                log_fields=fields,
            )  # fmt: skip
            return
        try:
            stream = await connect(
                self._ctx, spec.host, spec.port, sni=spec.sni, timeout=spec.connect_timeout
            )
        except MeshError as exc:
            log.warning(
                "upstream failed", extra={"event": "outbound.error", "reason": str(exc), **fields}
            )
            await app.aclose()
            return
        try:
            peer = check_peer(
                stream.peer_names(),
                trust_domain=spec.trust_domain,
                allowed_types=(spec.peer,),
                role="server",
            )
        except MeshError as exc:
            log.warning(
                "upstream refused",
                extra={"event": "outbound.refused", "reason": str(exc), **fields},
            )
            stream.abort()
            await app.aclose()
            return
        fields |= {"peer": peer.spiffe_id, "peer_uuid": peer.uuid}
        log.info("outbound connected", extra={"event": "outbound.connect", **fields})
        metrics = self._metrics
        counted = metrics.connection("outbound", spec.name, peer_id) if metrics else None
        started = time.monotonic()
        result = await relay(app, stream)
        if counted is not None:
            counted.closed(result.b_to_a, result.a_to_b, ok=result.error is None)
        log.info(
            "outbound closed",
            extra={"event": "outbound.close", "bytes_out": result.a_to_b,
                   "bytes_in": result.b_to_a, "reason": result.error or "eof",
                   "duration_ms": round((time.monotonic() - started) * 1000), **fields},
        )  # fmt: skip
