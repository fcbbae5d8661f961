"""``protocol: tcp`` listeners on the native engine: Python decides, C moves the bytes.

Inbound, the engine's worker threads accept on the listening socket themselves, run the
handshake, and for the common case (a peer whose SPIFFE ID is exactly one of the allowed
marble types of our trust domain, or any client of a public listener; the app accepting
at once) check the identity and connect the app's Unix socket in C and relay. Python
hears of such a connection twice: when it is relayed (the "inbound accepted" line and
the metrics) and when it ends (the "inbound closed" line). Anything else (an identity C
does not positively recognise, an app that does not accept at once, a PROXY header to
send first) comes to Python as a handshaken session, which ``pki.check_peer`` and the
rest of this module decide as before: C only takes the positive shortcut (fail closed).

Outbound, Python accepts the app's connection and dials the upstream, hands the TCP
socket to the engine (a client's ClientHello leaves at once), checks the identity and
hands the app's socket over too. Either way the worker relays both ways, with half-close
and back-pressure, until its final event, which becomes the same one log line per
connection as on the Python backend (``_inbound``/``_outbound``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meshproxy.errors import ConnectError, MeshError
from meshproxy.pki import PeerIdentity, check_peer
from meshproxy.proxy import _proxyproto
from meshproxy.proxy._inbound import InboundSpec
from meshproxy.proxy._metrics import Connection, ProxyMetrics
from meshproxy.proxy._outbound import OutboundSpec
from meshproxy.proxy._relay import ConnectionSet, bind_unix_socket, connect_unix
from meshproxy.tls import Handshake, NativeEngine, NativeSession

if TYPE_CHECKING:
    from meshproxy._native_tls import Context, Event

log_in = logging.getLogger("meshproxy.proxy.inbound")
log_out = logging.getLogger("meshproxy.proxy.outbound")

BACKLOG = 1024
ACCEPT_BATCH = 64  # accepts per readiness callback, so a flood cannot starve the loop
_RETRY_ACCEPT = 1.0  # out of fds or memory: pause accepting (asyncio does the same)
_FD_LIMITS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class _Acceptor:
    """Non-blocking accept on listening sockets, calling ``on_accept`` per connection."""

    def __init__(self, name: str, on_accept: Callable[[socket.socket, object], None]) -> None:
        self._name = name
        self._on_accept = on_accept
        self._socks: list[socket.socket] = []

    def watch(self, sock: socket.socket) -> None:
        self._socks.append(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._ready, sock)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._socks:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock.fileno())
            sock.close()
        self._socks.clear()

    def _ready(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _FD_LIMITS:
                    raise
                self._pause(sock, exc)
                return
            conn.setblocking(False)
            self._on_accept(conn, addr)

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        log_in.warning(
            "cannot accept, pausing", extra={"event": "listener.accept_paused",
                                             "listener": self._name, "reason": str(exc)},
        )  # fmt: skip

        def resume() -> None:
            if sock in self._socks:
                loop.add_reader(sock.fileno(), self._ready, sock)

        loop.call_later(_RETRY_ACCEPT, resume)


@functools.lru_cache(maxsize=1024)
def _check_peer(der: bytes, trust_domain: str, allowed: tuple[str, ...], role: str) -> PeerIdentity:
    """``pki.check_peer``, remembered: a peer presents the same (chain-verified) certificate
    on every connection of its lifetime, and the check is a pure function of these
    arguments. Parsing it each time was a third of Python's work per connection.
    Refusals raise, so they are never cached."""
    return check_peer(der, trust_domain=trust_domain, allowed_types=allowed, role=role)


def _count(
    metrics: ProxyMetrics | None, direction: str, listener: str, peer: PeerIdentity | str | None
) -> Connection | None:
    if metrics is None:
        return None
    peer_id = peer.spiffe_id if isinstance(peer, PeerIdentity) else peer or ""
    return metrics.connection(direction, listener, peer_id)


@dataclass
class _Accepted:
    """A connection the engine accepted, from its ACCEPTED event to its final one (or to
    Python taking it over)."""

    ended: asyncio.Future[None]  # what its stand-in in the ConnectionSet waits for
    fields: dict[str, object]
    counted: Connection | None = None
    started: float = 0.0


def _close_app(app: socket.socket) -> None:
    """Close the app's socket so that it reads EOF: a Unix socket closed with unread bytes
    resets its peer instead (the Python backend's transport has always read them)."""
    with contextlib.suppress(OSError):
        for _ in range(16):
            if not app.recv(16384, socket.MSG_DONTWAIT):
                break
    app.close()


class NativeInboundListener:
    """Inbound TLS on a TCP port -> the app's Unix socket, accepted and relayed by the engine."""

    def __init__(
        self,
        spec: InboundSpec,
        ctx: Context,
        engine: NativeEngine,
        connections: ConnectionSet,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.spec = spec
        self._ctx = ctx
        self._engine = engine
        self._connections = connections
        self._metrics = metrics
        self._port = spec.port
        self._listener: int | None = None
        self._accepted: dict[int, _Accepted] = {}
        if metrics is not None:
            metrics.watch_engine(engine.stats)
        kinds = engine.module
        self._kinds = (kinds.ACCEPTED, kinds.HANDSHAKE, kinds.HANDSHAKE_FAILED)

    def set_context(self, ctx: Context) -> None:
        """Rotation: new connections use ``ctx``; open ones keep the context they have."""
        self._ctx = ctx
        if self._listener is not None:
            self._engine.listener_context(self._listener, ctx)

    async def start(self) -> tuple[str, int]:
        """Listen; returns the address actually bound."""
        spec = self.spec
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(addr)
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            raise MeshError(
                f"inbound {spec.name}: cannot listen on {spec.host}:{spec.port}: "
                f"{exc.strerror or exc}"
            ) from None
        host, port = sock.getsockname()[:2]
        marbles = spec.clients == "marbles"
        try:
            self._listener = self._engine.listen(
                sock, self._ctx, self._event,
                app_path=self._raw_app_path(),
                trust_domain=spec.trust_domain if marbles else None,
                allowed=spec.allow if marbles else (), handshake_timeout=spec.handshake_timeout,
            )  # fmt: skip
        except MeshError as exc:
            sock.close()
            raise MeshError(f"inbound {spec.name}: {exc}") from None
        self._port = int(port)
        return str(host), int(port)

    def _raw_app_path(self) -> str | None:
        """The app socket the engine may connect and relay raw bytes to by itself: only
        for ``protocol: tcp`` without a PROXY header. An HTTP listener (a subclass with
        ``spec.http``) always gets its connections handed to Python (fail closed: the
        engine must never relay HTTP bytes past the header and route rules)."""
        spec = self.spec
        if spec.http is not None or spec.proxy_protocol:
            return None
        return str(spec.app_socket)

    def stop_accepting(self) -> None:
        """No new connections; the open ones are waited for by ``connections.drain``."""
        if self._listener is None:
            return
        listener, self._listener = self._listener, None
        self._engine.unlisten(listener)
        self._engine.poll()  # what was accepted so far counts in the drain

    async def _stand_in(self, conn_id: int, ended: asyncio.Future[None]) -> None:
        """An engine's connection in the ConnectionSet: done when it ends (or Python takes
        it over); cancelled (the end of a drain's grace period), it ends the connection."""
        try:
            await ended
        except asyncio.CancelledError:
            self._engine.close(conn_id, "shutdown")
            raise

    def _event(self, event: Event) -> None:
        """An event of one of our connections that no session claims (see NativeEngine)."""
        accepted, handshake, failed = self._kinds
        spec = self.spec
        if event.kind == accepted:
            ended = asyncio.get_running_loop().create_future()
            fields: dict[str, object] = {"listener": spec.name, "remote": event.remote or "?"}
            self._accepted[event.conn_id] = _Accepted(ended, fields)
            self._connections.spawn(self._stand_in(event.conn_id, ended))
            return
        conn = self._accepted.get(event.conn_id)
        if conn is None:
            return
        if event.kind == handshake and event.relaying:
            fields = conn.fields
            if spec.clients == "marbles":
                fields |= {"peer": event.peer_id, "peer_uuid": event.peer_uuid}
            else:
                fields["peer"] = "anonymous"
            log_in.info("inbound accepted", extra={"event": "inbound.accept", **fields})
            conn.counted = _count(self._metrics, "inbound", spec.name, event.peer_id)
            conn.started = time.monotonic()
            return
        del self._accepted[event.conn_id]
        if not conn.ended.done():  # cancelled with its stand-in at the end of a drain
            conn.ended.set_result(None)
        if event.kind == handshake:  # for Python to decide: the same path as before
            self._connections.spawn(self._serve(self._engine.adopt(event)))
        elif event.kind == failed:
            self._refuse(conn.fields, f"TLS handshake failed: {event.reason or 'handshake failed'}")
        else:
            if conn.counted is not None:
                ok = event.reason is None
                conn.counted.closed(event.tls_to_app, event.app_to_tls, ok=ok)
            log_in.info(
                "inbound closed",
                extra={"event": "inbound.close", "bytes_in": event.tls_to_app,
                       "bytes_out": event.app_to_tls, "reason": event.reason or "eof",
                       "duration_ms": round((time.monotonic() - conn.started) * 1000),
                       **conn.fields},
            )  # fmt: skip

    async def _serve(self, session: NativeSession) -> None:
        try:
            await self._serve_checked(session)
        except BaseException as exc:
            session.close("shutdown" if isinstance(exc, asyncio.CancelledError) else "error")
            raise

    async def _accept_checked(
        self, session: NativeSession
    ) -> tuple[Handshake, PeerIdentity | None, dict[str, object]] | None:
        """The handshake, the client's identity checked (marbles listeners) and the accept
        logged: the handshake, the peer and the connection's log fields; None when the
        connection was refused (logged, and closed)."""
        spec = self.spec
        fields: dict[str, object] = {"listener": spec.name, "remote": session.remote}
        try:
            hs = await session.handshake(spec.handshake_timeout)
        except ConnectError as exc:
            self._refuse(fields, f"TLS handshake failed: {exc}")
            return None
        peer: PeerIdentity | None = None
        if spec.clients == "marbles":
            try:
                peer = _check_peer(hs.peer_cert or b"", spec.trust_domain, spec.allow, "client")
            except MeshError as exc:
                self._refuse(fields, str(exc))
                session.close(str(exc))
                return None
            fields |= {"peer": peer.spiffe_id, "peer_uuid": peer.uuid}
        else:
            fields["peer"] = "anonymous"
        log_in.info("inbound accepted", extra={"event": "inbound.accept", **fields})
        return hs, peer, fields

    async def _serve_checked(self, session: NativeSession) -> None:
        spec = self.spec
        accepted = await self._accept_checked(session)
        if accepted is None:
            return
        _, peer, fields = accepted
        counted = _count(self._metrics, "inbound", spec.name, peer)
        loop = asyncio.get_running_loop()
        try:
            app = await connect_unix(spec.app_socket)
        except OSError as exc:
            log_in.warning(
                "app is not listening",
                extra={"event": "inbound.app_unavailable", "socket": str(spec.app_socket),
                       "reason": exc.strerror or str(exc), **fields},
            )  # fmt: skip
            session.close("app is not listening")
            if counted is not None:
                counted.closed(0, 0, ok=False)
            return
        try:
            if spec.proxy_protocol:
                header = _proxyproto.for_peer(peer, session.remote, (spec.host, self._port))
                await loop.sock_sendall(app, header)
        except BaseException:
            _close_app(app)
            raise
        started = time.monotonic()
        session.relay(app)
        result = await session.wait_closed()
        if counted is not None:
            counted.closed(result.tls_to_app, result.app_to_tls, ok=result.reason is None)
        log_in.info(
            "inbound closed",
            extra={"event": "inbound.close", "bytes_in": result.tls_to_app,
                   "bytes_out": result.app_to_tls, "reason": result.reason or "eof",
                   "duration_ms": round((time.monotonic() - started) * 1000), **fields},
        )  # fmt: skip

    def _refuse(self, fields: dict[str, object], reason: str) -> None:
        if self._metrics is not None:
            self._metrics.tcp_refused(self.spec.name)
        log_in.warning(
            "inbound refused", extra={"event": "inbound.refused", "reason": reason, **fields}
        )


class NativeOutboundListener:
    """The app's plaintext on a Unix socket -> mTLS to an upstream, relayed by the engine."""

    def __init__(
        self,
        spec: OutboundSpec,
        ctx: Context,
        engine: NativeEngine,
        connections: ConnectionSet,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        self.spec = spec
        self._ctx = ctx
        self._engine = engine
        self._connections = connections
        self._metrics = metrics
        self._acceptor = _Acceptor(spec.name, self._accepted)
        if metrics is not None:
            metrics.watch_engine(engine.stats)

    def set_context(self, ctx: Context) -> None:
        """Rotation: new connections use ``ctx``; open ones keep the context they have."""
        self._ctx = ctx

    async def start(self) -> Path:
        self._acceptor.watch(bind_unix_socket(self.spec.socket_path))
        return self.spec.socket_path

    def stop_accepting(self) -> None:
        self._acceptor.close()
        with contextlib.suppress(FileNotFoundError):
            self.spec.socket_path.unlink()

    def _accepted(self, app: socket.socket, _: object) -> None:
        self._connections.spawn(self._serve(app))

    async def _serve(self, app: socket.socket) -> None:
        session: list[NativeSession] = []
        try:
            await self._serve_checked(app, session)
        except BaseException as exc:
            if app.fileno() >= 0:  # the engine has not taken it over
                _close_app(app)
            for s in session:
                s.close("shutdown" if isinstance(exc, asyncio.CancelledError) else "error")
            raise

    async def _serve_checked(self, app: socket.socket, opened: list[NativeSession]) -> None:
        spec = self.spec
        upstream = f"{spec.host}:{spec.port}"
        fields: dict[str, object] = {"listener": spec.name, "upstream": upstream}
        try:
            tcp = await self._dial()
            session = self._engine.handshake(tcp, self._ctx, server_side=False, sni=spec.sni)
            opened.append(session)
            hs = await session.handshake(spec.connect_timeout)
        except ConnectError as exc:
            reason = str(exc) if not opened else f"TLS handshake with {upstream} failed: {exc}"
            log_out.warning(
                "upstream failed", extra={"event": "outbound.error", "reason": reason, **fields}
            )
            _close_app(app)
            return
        try:
            peer = _check_peer(hs.peer_cert or b"", spec.trust_domain, (spec.peer,), "server")
        except MeshError as exc:
            log_out.warning(
                "upstream refused",
                extra={"event": "outbound.refused", "reason": str(exc), **fields},
            )
            session.close(str(exc))
            _close_app(app)
            return
        fields |= {"peer": peer.spiffe_id, "peer_uuid": peer.uuid}
        log_out.info("outbound connected", extra={"event": "outbound.connect", **fields})
        counted = _count(self._metrics, "outbound", spec.name, peer)
        started = time.monotonic()
        session.relay(app)
        result = await session.wait_closed()
        if counted is not None:
            counted.closed(result.tls_to_app, result.app_to_tls, ok=result.reason is None)
        log_out.info(
            "outbound closed",
            extra={"event": "outbound.close", "bytes_out": result.app_to_tls,
                   "bytes_in": result.tls_to_app, "reason": result.reason or "eof",
                   "duration_ms": round((time.monotonic() - started) * 1000), **fields},
        )  # fmt: skip

    async def _dial(self) -> socket.socket:
        """TCP to the upstream, each resolved address in turn (as ``create_connection``)."""
        spec = self.spec
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        try:
            async with asyncio.timeout(spec.connect_timeout):
                infos = await loop.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM)
                for family, kind, proto, _, addr in infos:
                    sock = socket.socket(family, kind, proto)
                    try:
                        sock.setblocking(False)
                        await loop.sock_connect(sock, addr)
                    except OSError as exc:
                        sock.close()
                        last = exc
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    return sock
        except TimeoutError:
            raise ConnectError(f"connecting to {spec.host}:{spec.port} timed out") from None
        except OSError as exc:
            last = exc
        # uvloop's sock_connect words strerror as "Connect call failed (addr)": use errno
        reason = (os.strerror(last.errno) if last.errno else str(last)) if last else "no address"
        raise ConnectError(f"cannot connect to {spec.host}:{spec.port}: {reason}")
