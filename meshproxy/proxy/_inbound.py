"""Inbound: TLS on a host-visible TCP port -> plaintext to the app on a Unix socket.

Per connection: TLS handshake (the client certificate chains to the current intermediate,
checked by OpenSSL), then the identity check (``pki.check_peer``: our trust domain, an
allowed marble type) for ``clients: marbles``; only then is the app's socket opened.
Every refusal is one log line with the reason; an accepted connection logs who it is and,
when it ends, the bytes moved each way.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshproxy.errors import MeshError
from meshproxy.pki import PeerIdentity, check_peer
from meshproxy.proxy import _proxyproto
from meshproxy.proxy._metrics import Connection, ProxyMetrics
from meshproxy.proxy._relay import ConnectionSet, UnixStream, connect_unix, relay
from meshproxy.tls import TLSStream, describe_error

if TYPE_CHECKING:  # the HTTP layer (h2, h11) is loaded only when a listener speaks HTTP
    from meshproxy.proxy.http import InboundHttp

log = logging.getLogger("meshproxy.proxy.inbound")


@dataclass(frozen=True)
class InboundSpec:
    name: str
    host: str
    port: int  # 0: any free port, reported by start()
    clients: str  # "marbles" | "public"
    allow: tuple[str, ...]  # marble types allowed to call (marbles only)
    trust_domain: str
    app_socket: Path
    handshake_timeout: float = 10.0
    http: InboundHttp | None = None  # protocol: http (None: tcp)
    proxy_protocol: bool = False  # tcp: a PROXY v2 header with the peer identity first


class InboundListener:
    def __init__(
        self,
        spec: InboundSpec,
        ctx: ssl.SSLContext,
        connections: ConnectionSet,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.spec = spec
        self._ctx = ctx
        self._connections = connections
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._port = spec.port

    def set_context(self, ctx: ssl.SSLContext) -> None:
        """Rotation: new connections use ``ctx``; open ones keep the context they have."""
        self._ctx = ctx

    async def start(self) -> tuple[str, int]:
        """Listen; returns the address actually bound."""
        loop = asyncio.get_running_loop()

        def factory() -> TLSStream:
            return TLSStream(self._ctx, server_side=True, on_connection=self._accepted)

        try:
            self._server = await loop.create_server(
                factory, self.spec.host, self.spec.port, reuse_address=True
            )
        except OSError as exc:
            raise MeshError(
                f"inbound {self.spec.name}: cannot listen on {self.spec.host}:{self.spec.port}: "
                f"{exc.strerror or exc}"
            ) from None
        host, port = self._server.sockets[0].getsockname()[:2]
        self._port = int(port)
        return str(host), int(port)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accepted(self, stream: TLSStream) -> None:
        self._connections.spawn(self._serve(stream))

    async def _serve(self, stream: TLSStream) -> None:
        try:
            await self._serve_checked(stream)
        except asyncio.CancelledError:  # shutdown ended the grace period
            stream.abort()
            raise

    async def _serve_checked(self, stream: TLSStream) -> None:
        spec = self.spec
        fields: dict[str, object] = {"listener": spec.name, "remote": stream.remote}
        try:
            await stream.handshake(spec.handshake_timeout)
        except (OSError, MeshError) as exc:
            reason = describe_error(exc) if isinstance(exc, OSError) else str(exc)
            self._refuse(fields, f"TLS handshake failed: {reason}")
            await stream.aclose()
            return
        peer: PeerIdentity | None = None
        denied: str | None = None
        if spec.clients == "marbles":
            try:
                peer = check_peer(
                    stream.peer_names(),
                    trust_domain=spec.trust_domain,
                    allowed_types=spec.allow,
                    role="client",
                )
            except MeshError as exc:
                if spec.http is not None and spec.http.mode == "hbone":
                    from meshproxy.proxy.http import hbone_caller

                    peer = hbone_caller(stream.peer_names(), spec.trust_domain)
                if peer is None:
                    self._refuse(fields, str(exc))
                    await stream.aclose()
                    return
                denied = str(exc)  # HBONE: of our domain, not allowed: 401 per CONNECT
            fields |= {"peer": peer.spiffe_id, "peer_uuid": peer.uuid}
        else:
            fields["peer"] = "anonymous"
        log.info("inbound accepted", extra={"event": "inbound.accept", **fields})
        if spec.http is not None:
            from meshproxy.proxy.http import serve_inbound_http

            await serve_inbound_http(
                stream, listener=spec.name, app_socket=spec.app_socket, settings=spec.http,
                peer=peer, denied=denied, metrics=self._metrics, log_fields=fields,
            )  # fmt: skip
            return
        counted = self._count(peer)
        try:
            app = await connect_unix(spec.app_socket)
            reader, writer = await asyncio.open_unix_connection(sock=app)
        except OSError as exc:
            log.warning(
                "app is not listening",
                extra={"event": "inbound.app_unavailable", "socket": str(spec.app_socket),
                       "reason": exc.strerror or str(exc), **fields},
            )  # fmt: skip
            await stream.aclose()
            if counted is not None:
                counted.closed(0, 0, ok=False)
            return
        if spec.proxy_protocol:
            writer.write(_proxyproto.for_peer(peer, stream.remote, (spec.host, self._port)))
        started = time.monotonic()
        result = await relay(stream, UnixStream(reader, writer))
        if counted is not None:
            counted.closed(result.a_to_b, result.b_to_a, ok=result.error is None)
        log.info(
            "inbound closed",
            extra={"event": "inbound.close", "bytes_in": result.a_to_b,
                   "bytes_out": result.b_to_a, "reason": result.error or "eof",
                   "duration_ms": round((time.monotonic() - started) * 1000), **fields},
        )  # fmt: skip

    def _count(self, peer: PeerIdentity | None) -> Connection | None:
        if self._metrics is None:
            return None
        return self._metrics.connection("inbound", self.spec.name, peer.spiffe_id if peer else "")

    def _refuse(self, fields: dict[str, object], reason: str) -> None:
        if self._metrics is not None:
            self._metrics.tcp_refused(self.spec.name)
        log.warning(
            "inbound refused", extra={"event": "inbound.refused", "reason": reason, **fields}
        )
