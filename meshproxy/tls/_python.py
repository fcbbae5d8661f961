"""The pure-Python TLS backend: stdlib ``ssl`` contexts and a TLS stream on asyncio.

Contexts are built from in-memory PEM. The private key reaches OpenSSL through an
anonymous memfd opened by ``/proc/self/fd/N`` and closed at once, so it never has a name
in any filesystem. Every context is TLS 1.3 only and without session tickets (a ticket
would outlive a certificate rotation, and a leaked ticket key decrypts every session
resumed with it) unless the listener's ``tls:`` config allows 1.2 (ECDHE with AES-GCM or
ChaCha20 only) or tickets; and without ALPN for TCP listeners (never ``istio*``).

``TLSStream`` runs TLS over memory BIOs on a plain TCP transport instead of asyncio's SSL
transport, because that one turns a peer's close_notify into a full close. Here a
close_notify is a half-close: ``read`` returns ``b""`` and the stream can still write;
``write_eof`` sends our close_notify and keeps reading. Complete records are decrypted as
soon as they arrive (so ``SSL_shutdown`` never meets unread application data) into a
bounded buffer; the socket is paused while the buffer is full.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from meshproxy._redact import Secret
from meshproxy.errors import ConnectError, PKIError
from meshproxy.pki import CertNames

CHUNK = 64 * 1024
_HIGH_WATER = 256 * 1024  # plaintext held for a slow consumer before the socket is paused
_CLOSE_TIMEOUT = 5.0


@dataclass(frozen=True)
class TLSIdentity:
    """What a marble presents and trusts: leaf + intermediate, its key, the intermediate."""

    chain_pem: bytes
    key_pem: Secret = field(repr=False)
    trust_pem: bytes


TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # forward secret, AEAD; as the native engine


def server_context(
    identity: TLSIdentity, *, client_auth: bool, min_version: str = "1.3", tickets: bool = False
) -> ssl.SSLContext:
    """A listener's context: mTLS against the intermediate, or server-auth only (public)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, min_version, tickets)
    if not tickets:
        ctx.num_tickets = 0
    _load_identity(ctx, identity)
    if client_auth:
        _trust(ctx, identity.trust_pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    identity: TLSIdentity,
    *,
    alpn: Sequence[str] = (),
    min_version: str = "1.3",
    tickets: bool = False,
) -> ssl.SSLContext:
    """An outbound context. The name is not checked here: ``pki.check_peer`` checks the
    marble identity in the certificate after the handshake (by type, not by DNS name)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, min_version, tickets)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    _trust(ctx, identity.trust_pem)
    _load_identity(ctx, identity)
    if alpn:
        if any(p.lower().startswith("istio") for p in alpn):
            raise ValueError("istio ALPN values must never be offered")
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _harden(ctx: ssl.SSLContext, min_version: str, tickets: bool) -> None:
    if min_version not in TLS_VERSIONS:
        raise ValueError(f"min_version must be 1.2 or 1.3, not {min_version!r}")
    ctx.minimum_version = TLS_VERSIONS[min_version]
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if min_version == "1.2":
        ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET


def _trust(ctx: ssl.SSLContext, trust_pem: bytes) -> None:
    # The intermediate is the anchor: leaves of a replaced intermediate (an older
    # manifest) must fail even though they still chain to the same root.
    try:
        ctx.load_verify_locations(cadata=trust_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise PKIError(f"trust anchor is not a valid PEM certificate: {exc}") from None
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN


def _load_identity(ctx: ssl.SSLContext, identity: TLSIdentity) -> None:
    fd = os.memfd_create("meshproxy-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(identity.chain_pem + b"\n" + identity.key_pem.reveal())
        while view:
            view = view[os.write(fd, view) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except ssl.SSLError as exc:
        raise PKIError(f"certificate chain and private key do not load: {exc.reason}") from None
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)


class TLSStream(asyncio.Protocol):
    """One TLS connection over a TCP transport, read and written like a stream."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        on_connection: Callable[[TLSStream], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._server_side = server_side
        self._on_connection = on_connection
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._plain = bytearray()
        self._eof = False  # the peer's close_notify arrived
        self._error: OSError | None = None
        self._reader: asyncio.Future[None] | None = None
        self._drainer: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._wrote_eof = False
        self._peer_der: bytes | None = None
        self._peer_decoded: dict[str, Any] = {}
        self.remote = "?"

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        self.remote = _format_peer(self._transport.get_extra_info("peername"))
        if not self._server_side:
            self._advance()  # the ClientHello leaves now: meshes sniff the first bytes
        if self._on_connection is not None:
            self._on_connection(self)

    def data_received(self, data: bytes) -> None:
        self._in.write(data)
        self._advance()

    def eof_received(self) -> bool:
        self._in.write_eof()
        self._advance()
        return True  # keep our sending side: the peer may only have half-closed

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._eof and self._error is None:
            self._fail(ConnectionResetError(f"connection lost: {exc or 'closed by peer'}"))
        if not self._lost.done():
            self._lost.set_result(None)
        self._wake_writer()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writer()

    # -- the stream -----------------------------------------------------------------------
    async def handshake(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._handshake), timeout)
        except TimeoutError:
            self.abort()
            raise ConnectError(f"TLS handshake with {self.remote} timed out") from None

    def peer_certificate(self) -> bytes | None:
        """The peer's leaf (DER) after a verified handshake; None for anonymous clients."""
        return self._peer_der

    def peer_names(self) -> CertNames:
        """The verified peer's SAN URIs and organizations as OpenSSL decoded them: what
        ``pki.check_peer`` needs, without parsing the certificate again (``cryptography``
        would cost the proxy 10 MB of memory for it)."""
        return CertNames.from_ssl(self._peer_decoded)

    async def read(self) -> bytes:
        """Plaintext as it arrives; ``b""`` once the peer sent close_notify."""
        while not self._plain:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._reader = self._loop.create_future()
            await self._reader
        data = bytes(self._plain)
        self._plain.clear()
        if self._read_paused and self._transport is not None:
            self._read_paused = False
            self._transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._transport is None or self._transport.is_closing():
            raise BrokenPipeError("TLS connection is closed")
        try:
            view = memoryview(data)
            while view:
                view = view[self._tls.write(view) :]
        except ssl.SSLError as exc:
            self._fail(exc)
            raise
        self._flush()
        await self._drain()

    async def write_eof(self) -> None:
        """Half-close: send close_notify (then FIN) and keep receiving."""
        if self._wrote_eof or self._error is not None:
            return
        self._wrote_eof = True
        self._pull()  # shutdown must not meet a complete, unread record
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify sent; the peer's comes later, through read()
        except ssl.SSLError as exc:
            self._fail(exc)
            raise
        self._flush()
        if self._transport is not None and self._transport.can_write_eof():
            self._transport.write_eof()
        await self._drain()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def aclose(self) -> None:
        if self._transport is None:
            return
        self._transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), _CLOSE_TIMEOUT)
        except TimeoutError:
            self._transport.abort()

    # -- the engine -----------------------------------------------------------------------
    def _advance(self) -> None:
        if not self._handshake.done():
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError) as exc:
                self._flush()  # the alert tells the peer why
                self._fail(exc)
                return
            self._flush()
            # Kept now: a fatal alert right after the handshake (the server refusing our
            # certificate, in TLS 1.3) resets what the SSL object reports.
            self._peer_der = self._tls.getpeercert(binary_form=True)
            self._peer_decoded = dict(self._tls.getpeercert() or {})
            self._handshake.set_result(None)
        self._pull()

    def _pull(self) -> None:
        if self._eof or self._error is not None or not self._handshake.done():
            return
        try:
            while chunk := self._tls.read(CHUNK):
                self._plain += chunk
            self._eof = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True
        except ssl.SSLEOFError:
            self._fail(ConnectionResetError("peer closed TCP without TLS close_notify"))
        except ssl.SSLError as exc:
            self._fail(exc)
        self._flush()
        if len(self._plain) >= _HIGH_WATER and not self._read_paused and self._transport:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def _flush(self) -> None:
        data = self._out.read()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def _drain(self) -> None:
        while self._write_paused and self._error is None:
            self._drainer = self._loop.create_future()
            await self._drainer
        if self._error is not None:
            raise self._error

    def _fail(self, exc: OSError) -> None:
        if self._error is None:
            self._error = exc
        if not self._handshake.done():
            self._handshake.set_exception(exc)
            self._handshake.exception()  # retrieved: nobody may be waiting yet
        self._wake_reader()
        self._wake_writer()

    def _wake_reader(self) -> None:
        if self._reader is not None and not self._reader.done():
            self._reader.set_result(None)

    def _wake_writer(self) -> None:
        if self._drainer is not None and not self._drainer.done():
            self._drainer.set_result(None)


def _format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "?"


async def connect(
    ctx: ssl.SSLContext, host: str, port: int, *, sni: str | None, timeout: float
) -> TLSStream:
    """Open TCP to ``host:port`` and complete a TLS handshake (ClientHello sent at once)."""
    loop = asyncio.get_running_loop()
    try:
        _, stream = await asyncio.wait_for(
            loop.create_connection(
                lambda: TLSStream(ctx, server_side=False, server_hostname=sni), host, port
            ),
            timeout,
        )
    except TimeoutError:
        raise ConnectError(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise ConnectError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    try:
        await stream.handshake(timeout)
    except asyncio.CancelledError:
        stream.abort()
        raise
    except OSError as exc:
        stream.abort()
        raise ConnectError(
            f"TLS handshake with {host}:{port} failed: {describe_error(exc)}"
        ) from None
    return stream


def describe_error(exc: OSError) -> str:
    """One readable line for a TLS or socket error (for log lines and messages)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc)
