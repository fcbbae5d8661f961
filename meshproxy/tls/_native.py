"""The native TLS backend: ``meshproxy._native_tls`` contexts and its engine on asyncio.

The C engine owns the TLS sessions of ``protocol: tcp`` listeners and relays their bytes
to the app's Unix socket on its own worker threads, without the GIL. Python never sees
those bytes; it sees events. ``NativeEngine`` binds the engine to the running loop: the
engine's eventfd is a loop reader, and each batch of events resolves the futures of the
``NativeSession`` they belong to (``HANDSHAKE`` -> the handshake future; a final
``HANDSHAKE_FAILED`` or ``CLOSED`` -> the handshake future fails, the closed future
resolves). A socket is handed over with ``detach()`` only after the engine accepted it,
so every fd has exactly one owner that closes it.

A listening socket can be handed over too (``listen``): the workers accept on it, and
the events of its connections go to the listener's handler, which either takes note of
a connection the engine already relays (``relaying``) or ``adopt``s it as a session.

Native failures arrive as ``NativeError`` and become ``MeshError``s in ``_translate``,
and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from meshproxy.errors import ConnectError, MeshError, NativeUnavailable, PKIError
from meshproxy.tls._python import TLSIdentity

if TYPE_CHECKING:
    from meshproxy._native_tls import Context, Engine, Event

DISABLE_ENV = "MESHPROXY_NATIVE_MODULE_DISABLE"  # "1": behave as if the module were not built

# Chosen by measurement (native_tls/README.md): 128 KiB direction buffers (64 -> 128 KiB
# gave TLS->app +10-15 %; 256 KiB little more for twice the worst-case memory), 64 KiB
# read-ahead, TLS records gathered into one send() (app->TLS +10 %). Idle sessions give
# OpenSSL's buffers back (SSL_MODE_RELEASE_BUFFERS): 5-10 % of bulk throughput traded for
# no per-connection buffer memory at rest, which an enclave's EPC needs more.
ENGINE_API = 2  # engine listeners (accept, identity and app connect in C)
BUFFER_SIZE = 128 * 1024
READ_BUFFER_SIZE = 64 * 1024


def load() -> ModuleType:
    """The compiled engine, or ``NativeUnavailable`` saying why it cannot be used."""
    if os.environ.get(DISABLE_ENV) == "1":
        raise NativeUnavailable(f"meshproxy._native_tls is disabled by {DISABLE_ENV}=1")
    try:
        _native_tls = importlib.import_module("meshproxy._native_tls")  # honours sys.modules
    except ImportError as exc:
        raise NativeUnavailable(
            f"meshproxy._native_tls is not built or does not load ({exc}); "
            "install meshproxy with pip to compile it"
        ) from None
    if _native_tls.ENGINE_API < ENGINE_API:
        raise NativeUnavailable(
            f"meshproxy._native_tls is out of date (ENGINE_API {_native_tls.ENGINE_API}, "
            f"need {ENGINE_API}); rebuild it with pip"
        )
    return _native_tls


@contextlib.contextmanager
def _translate(what: str, native: ModuleType | None = None) -> Iterator[None]:
    """The one place where native failures become meshproxy errors."""
    native = native or load()
    try:
        yield
    except native.NativeError as exc:
        message = str(exc)
        error: MeshError
        if what == "context":
            error = PKIError(f"TLS context: {message}")
        elif what == "engine":
            error = NativeUnavailable(f"the native TLS engine cannot start: {message}")
        else:
            error = ConnectError(f"native TLS engine: {message}")
        raise error from None


# -- contexts -------------------------------------------------------------------------------
def native_server_context(
    identity: TLSIdentity, *, client_auth: bool, alpn: Sequence[str] = ()
) -> Context:
    """A listener's context: mTLS against the intermediate, or server-auth only (public);
    ``alpn``: the protocols it selects from (an HTTP listener's ``h2``, ``http/1.1``)."""
    if any(p.lower().startswith("istio") for p in alpn):
        raise ValueError("istio ALPN values are never used")
    return _context(identity, server=True, verify_peer=client_auth, alpn=alpn)


def native_client_context(identity: TLSIdentity, *, alpn: Sequence[str] = ()) -> Context:
    """An outbound context; ``pki.check_peer`` checks the identity after the handshake."""
    if any(p.lower().startswith("istio") for p in alpn):
        raise ValueError("istio ALPN values must never be offered")
    return _context(identity, server=False, verify_peer=True, alpn=alpn)


def _context(
    identity: TLSIdentity, *, server: bool, verify_peer: bool, alpn: Sequence[str]
) -> Context:
    native = load()
    key = bytearray(identity.key_pem.reveal())  # a private copy, wiped by the constructor
    try:
        with _translate("context"):
            ctx: Context = native.Context(
                identity.chain_pem,
                key,
                identity.trust_pem,
                server=server,
                verify_peer=verify_peer,
                alpn=tuple(alpn),
            )
    finally:
        key[:] = bytes(len(key))  # already wiped in C; again in case the call failed early
    return ctx


# -- sessions and the engine ----------------------------------------------------------------
@dataclass(frozen=True)
class Handshake:
    """What a completed handshake proved and negotiated."""

    peer_cert: bytes | None  # the peer's leaf (DER), None for an anonymous client
    alpn: str | None
    version: str
    cipher: str


@dataclass(frozen=True)
class Closed:
    """How a connection ended: plaintext bytes each way, and why (None: EOF both ways)."""

    tls_to_app: int
    app_to_tls: int
    reason: str | None
    http: dict[str, Any] | None = None  # an HTTP/2 relay's counters (native_tls/h2relay.h)


class NativeSession:
    """One connection owned by the engine, seen from asyncio."""

    def __init__(self, engine: NativeEngine, conn_id: int, remote: str) -> None:
        loop = asyncio.get_running_loop()
        self.conn_id = conn_id
        self.remote = remote
        self._engine = engine
        self._handshake: asyncio.Future[Handshake] = loop.create_future()
        self._closed: asyncio.Future[Closed] = loop.create_future()
        self._on_refused: Callable[[Any], None] | None = None
        self._on_stats: Callable[[dict[str, Any]], None] | None = None

    async def handshake(self, timeout: float) -> Handshake:
        """The handshake's result; ``ConnectError`` (the reason) when it failed."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._handshake), timeout)
        except TimeoutError:
            self.close("TLS handshake timed out")
            raise ConnectError(f"TLS handshake with {self.remote} timed out") from None

    def relay(self, app: socket.socket) -> None:
        """Relay to the app's (connected) Unix socket; the engine takes the socket over."""
        if self._closed.done():
            app.close()  # ended meanwhile (for instance a shutdown)
            return
        try:
            with _translate("relay", self._engine.module):
                self._engine.native.relay(self.conn_id, app.fileno())
        except MeshError:
            app.close()
            raise
        app.detach()

    def relay_h2(
        self,
        app: socket.socket,
        policy: tuple[Any, ...],
        on_refused: Callable[[Any], None],
        on_stats: Callable[[dict[str, Any]], None],
    ) -> None:
        """``relay`` as an HTTP/2 relay (client h2 -> app h2c, native_tls/h2relay.h) with
        ``policy``; ``on_refused`` gets each refused request (stream, status, method, path,
        reason), ``on_stats`` the request counters as they accrue (the last ones come with
        the closed result, ``Closed.http``)."""
        if self._closed.done():
            app.close()
            return
        self._on_refused = on_refused
        self._on_stats = on_stats
        try:
            with _translate("relay", self._engine.module):
                self._engine.native.relay_h2(self.conn_id, app.fileno(), policy)
        except MeshError:
            app.close()
            raise
        app.detach()

    def drain_h2(self) -> None:
        """Shutdown of an HTTP/2 relay: GOAWAY now; it ends (reason ``drained``) once its
        streams are done."""
        if not self._closed.done() and not self._engine._closing:
            with _translate("drain", self._engine.module):
                self._engine.native.drain_h2(self.conn_id)

    def close(self, reason: str) -> None:
        """End the connection (idempotent); its closed future resolves with ``reason``."""
        if not self._closed.done():
            self._engine.close(self.conn_id, reason)

    async def wait_closed(self) -> Closed:
        return await asyncio.shield(self._closed)

    # -- called by the engine's event dispatch ---------------------------------------------
    def _handshook(self, result: Handshake) -> None:
        if not self._handshake.done():
            self._handshake.set_result(result)

    def _ended(self, result: Closed, *, handshake_failed: bool) -> None:
        if not self._handshake.done():
            why = result.reason or ("handshake failed" if handshake_failed else "closed")
            self._handshake.set_exception(ConnectError(why))
            self._handshake.exception()  # retrieved: nobody may be waiting for it
        if not self._closed.done():
            self._closed.set_result(result)


class NativeEngine:
    """The C engine's worker threads, bound to the running event loop."""

    def __init__(self, threads: int | None = None) -> None:
        native = self.module = load()
        with _translate("engine", native):
            self.native: Engine = native.Engine(
                threads or 0, buffer_size=BUFFER_SIZE, read_buffer_size=READ_BUFFER_SIZE
            )
        self._kinds = (native.HANDSHAKE, native.HANDSHAKE_FAILED, native.CLOSED)
        self._refused = getattr(native, "HTTP_REFUSED", -1)
        self._stats = getattr(native, "HTTP_STATS", -1)
        self._loop = asyncio.get_running_loop()
        self._sessions: dict[int, NativeSession] = {}
        self._listeners: dict[int, Callable[[Event], None]] = {}
        self._closing = False
        self._loop.add_reader(self.native.fileno(), self._dispatch)

    @property
    def threads(self) -> int:
        return self.native.threads

    def __len__(self) -> int:
        return len(self._sessions)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: handshakes, active connections, bytes, buffer memory."""
        return self.native.stats()

    def handshake(
        self,
        sock: socket.socket,
        ctx: Context,
        *,
        server_side: bool,
        sni: str | None = None,
        remote: str | None = None,
    ) -> NativeSession:
        """Hand a connected TCP socket to a worker; the handshake starts at once."""
        if self._closing:
            sock.close()
            raise ConnectError("native TLS engine is shutting down")
        remote = remote or format_peer(sock)
        try:
            with _translate("handshake", self.module):
                conn_id = self.native.handshake(sock.fileno(), ctx, server_side, sni)
        except MeshError:
            sock.close()
            raise
        sock.detach()
        session = NativeSession(self, conn_id, remote)
        self._sessions[conn_id] = session
        return session

    def listen(
        self,
        sock: socket.socket,
        ctx: Context,
        handler: Callable[[Event], None],
        *,
        app_path: str | None,
        trust_domain: str | None,
        allowed: Sequence[str],
        handshake_timeout: float,
    ) -> int:
        """Hand a bound, listening socket to the workers; returns the listener id.

        ``trust_domain`` None: clients are anonymous (public). ``app_path`` None: the
        engine never connects the app itself. Every event of the listener's connections
        that no session claims goes to ``handler``.
        """
        if self._closing:
            raise ConnectError("native TLS engine is shutting down")
        with _translate("listen", self.module):
            lid: int = self.native.listen(
                sock.fileno(), ctx, app_path=app_path, trust_domain=trust_domain,
                allowed=tuple(allowed), anonymous=trust_domain is None,
                handshake_timeout=handshake_timeout,
            )  # fmt: skip
        sock.detach()
        self._listeners[lid] = handler
        return lid

    def listener_context(self, listener_id: int, ctx: Context) -> None:
        """Rotation: the listener's new connections use ``ctx``."""
        with _translate("listen", self.module):
            self.native.listener_context(listener_id, ctx)

    def unlisten(self, listener_id: int) -> None:
        """Stop accepting (the engine closes the socket); open connections go on."""
        if not self._closing:
            with _translate("listen", self.module):
                self.native.unlisten(listener_id)

    def poll(self) -> None:
        """Dispatch the events waiting now. The engine wakes the loop late (up to 10 ms)
        for events only logs and metrics need; this makes the state current."""
        if not self._closing:
            self._dispatch()

    def adopt(self, event: Event) -> NativeSession:
        """A listener's connection the engine left to us (its HANDSHAKE event, not
        relaying): a session whose handshake is done, waiting for relay() or close()."""
        session = NativeSession(self, event.conn_id, event.remote or "?")
        session._handshook(_handshake_of(event))
        self._sessions[event.conn_id] = session
        return session

    def close(self, conn_id: int, reason: str) -> None:
        if self._closing:
            return  # shutting down: every session ends anyway
        with _translate("close", self.module):
            self.native.close(conn_id, reason)

    async def aclose(self) -> None:
        """End every connection, stop the workers, and resolve every session."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self.native.fileno())
        await asyncio.to_thread(self.native.shutdown)  # joins the threads
        self._dispatch()
        for session in list(self._sessions.values()):
            session._ended(Closed(0, 0, "engine stopped"), handshake_failed=False)
        self._sessions.clear()

    def _dispatch(self) -> None:
        handshake, failed, _ = self._kinds
        for event in self.native.events():
            session = self._sessions.get(event.conn_id)
            if session is None:
                handler = self._listeners.get(event.listener)
                if handler is not None:
                    handler(event)
                continue
            if event.kind == handshake:
                session._handshook(_handshake_of(event))
            elif event.kind == self._refused:
                if session._on_refused is not None:
                    session._on_refused(event.refusal)
            elif event.kind == self._stats:
                if session._on_stats is not None and event.http is not None:
                    session._on_stats(event.http)
            else:
                del self._sessions[event.conn_id]
                closed = Closed(event.tls_to_app, event.app_to_tls, event.reason, event.http)
                session._ended(closed, handshake_failed=event.kind == failed)


def _handshake_of(event: Event) -> Handshake:
    return Handshake(event.peer_cert, event.alpn, event.version or "?", event.cipher or "?")


def format_peer(sock: socket.socket) -> str:
    """``host:port`` of a TCP socket's peer, for log lines."""
    try:
        return format_address(sock.getpeername())
    except OSError:
        return "?"


def format_address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "?"
