"""Type stub of the C extension built from native_tls/{module,engine,context}.c.

Use it through ``meshproxy.tls`` (``NativeEngine``, ``native_server_context``...), which
translates ``NativeError`` into the ``MeshError`` tree.
"""

from collections.abc import Sequence
from typing import Any, Final, final

ENGINE_API: Final[int]
"""Version of the relay-engine interface; >= 1: Engine, Context and Event below exist;
>= 2: Engine.listen (the engine accepts, checks identities and connects apps itself)."""

HANDSHAKE: Final[int]
"""Event kind: the handshake completed; the connection waits for relay() or close()."""
HANDSHAKE_FAILED: Final[int]
"""Final event kind: the handshake failed (reason says why); the socket is closed."""
CLOSED: Final[int]
HTTP_REFUSED: Final[int]
"""Event kind of an HTTP/2 relay: a request the route rules refused (``refusal``)."""
HTTP_STATS: Final[int]
"""Event kind of an HTTP/2 relay: request counters since the last ones (``http``)."""
H2_RELAY: Final[int]
"""1: ``Engine.relay_h2`` exists."""
"""Final event kind: the connection ended; reason None means EOF in both directions."""
ACCEPTED: Final[int]
"""Event kind: an engine listener accepted the connection (its first event)."""

class NativeError(Exception):
    """A failure inside the native engine; the message says what and why."""

@final
class Context:
    """An SSL_CTX built from in-memory PEM; ``key_pem`` is wiped before this returns."""

    def __init__(
        self,
        chain_pem: bytes,
        key_pem: bytearray,
        trust_pem: bytes | None,
        *,
        server: bool,
        verify_peer: bool,
        partial_chain: bool = True,
        min_version: str = "1.3",
        tickets: bool = False,
        alpn: Sequence[str] = (),
    ) -> None: ...
    @property
    def server(self) -> bool: ...

@final
class Event(tuple[object, ...]):
    """What the engine reports about a connection (a struct sequence)."""

    @property
    def conn_id(self) -> int: ...
    @property
    def kind(self) -> int: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def peer_cert(self) -> bytes | None: ...
    @property
    def alpn(self) -> str | None: ...
    @property
    def version(self) -> str | None: ...
    @property
    def cipher(self) -> str | None: ...
    @property
    def tls_to_app(self) -> int: ...
    @property
    def app_to_tls(self) -> int: ...
    @property
    def http(self) -> dict[str, Any] | None: ...
    @property
    def refusal(self) -> tuple[int, int, str, str, str] | None: ...
    @property
    def listener(self) -> int:
        """The engine's listener that accepted the connection (0: handed over)."""
    @property
    def relaying(self) -> bool:
        """HANDSHAKE: the engine checked the identity, connected the app and relays."""
    @property
    def remote(self) -> str | None:
        """Listener connections: the peer's ``host:port``."""
    @property
    def peer_id(self) -> str | None:
        """HANDSHAKE with relaying: the peer's SPIFFE ID (None: anonymous client)."""
    @property
    def peer_uuid(self) -> str | None:
        """HANDSHAKE with relaying: the peer's instance UUID, if its certificate has one."""

@final
class Engine:
    """Worker threads (0: one per available CPU) owning TLS sessions of the tcp data path."""

    def __init__(
        self,
        threads: int = 0,
        *,
        buffer_size: int = 65536,
        read_buffer_size: int = 65536,
        coalesce_writes: bool = True,
        release_buffers: bool = True,
    ) -> None: ...
    @property
    def threads(self) -> int: ...
    def fileno(self) -> int:
        """An eventfd, readable while events wait in ``events()``."""
    def handshake(self, fd: int, ctx: Context, server_side: bool, sni: str | None = None) -> int:
        """Start TLS on a connected TCP socket; the engine owns ``fd`` once this returns."""
    def listen(
        self,
        fd: int,
        ctx: Context,
        *,
        app_path: str | None = None,
        trust_domain: str | None = None,
        allowed: Sequence[str] = (),
        anonymous: bool = False,
        handshake_timeout: float = 10.0,
    ) -> int:
        """Accept on a listening TCP socket in the workers; the engine owns ``fd`` once
        this returns. Returns the listener id."""
    def listener_context(self, listener_id: int, ctx: Context) -> None:
        """New connections of the listener use ``ctx``."""
    def unlisten(self, listener_id: int) -> None:
        """Stop accepting; the engine closes the listening socket. Idempotent."""
    def relay(self, conn_id: int, fd: int) -> None:
        """Relay a handshaken connection to the app's Unix socket; the engine owns ``fd``."""
    def relay_h2(self, conn_id: int, fd: int, policy: tuple[Any, ...]) -> None:
        """``relay`` as an HTTP/2 relay (client h2 -> app h2c), see native_tls/h2relay.h."""
    def drain_h2(self, conn_id: int) -> None:
        """Shutdown of an HTTP/2 relay: GOAWAY now, it ends when its streams are done."""
    def close(self, conn_id: int, reason: str) -> None:
        """End a connection; its final event carries ``reason``."""
    def events(self) -> list[Event]:
        """Every waiting event, oldest first."""
    def stats(self) -> dict[str, int]:
        """threads, active, handshakes, handshake_failures, closed, bytes_*, buffer_bytes,
        accepted, fast_path."""
    def shutdown(self) -> None:
        """End every connection and join the workers (idempotent)."""

def openssl_version() -> str:
    """``OpenSSL_version(OPENSSL_VERSION)`` of the libssl this module is linked against."""

def ec_method() -> tuple[bool, int]:
    """Whether OpenSSL's default for EC keys is the engine's built-in EC method
    (native_tls/context.c, ``legacy_ec``: certificate keys skip OpenSSL 3.0's provider
    decoder chain), and how many EC key operations (signatures, verifications, P-256 ECDH)
    took it since it was installed. Asks OpenSSL, so it is process-wide."""

@final
class H2Relay:
    """The engine's HTTP/2 relay core without I/O (native_tls/h2relay.h), for tests."""

    def __init__(self, policy: tuple[Any, ...]) -> None: ...
    def feed_client(self, data: bytes, now_ns: int) -> bool: ...
    def feed_app(self, data: bytes, now_ns: int) -> bool: ...
    def take_app(self) -> bytes: ...
    def take_client(self) -> bytes: ...
    def refusals(self) -> list[tuple[int, int, str, str, str]]: ...
    def stats(self, now_ns: int = 0, finish: bool = False) -> dict[str, Any]: ...
    def drain(self) -> None: ...
    @property
    def drained(self) -> bool: ...
    @property
    def failed(self) -> bool: ...
    @property
    def error(self) -> str | None: ...
