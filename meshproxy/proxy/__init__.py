"""The data plane: inbound and outbound listeners, the byte relay, the admin endpoint.

Plaintext is only ever exchanged with the app over Unix sockets in the workdir; every
TCP connection the proxy makes or accepts is TLS 1.3 with an identity check.
"""

from meshproxy.proxy._admin import AdminServer
from meshproxy.proxy._inbound import InboundListener, InboundSpec
from meshproxy.proxy._metrics import ProxyMetrics
from meshproxy.proxy._native import NativeInboundListener, NativeOutboundListener
from meshproxy.proxy._outbound import OutboundListener, OutboundSpec
from meshproxy.proxy._relay import (
    ByteStream,
    ConnectionSet,
    RelayResult,
    UnixStream,
    bind_unix_socket,
    connect_unix,
    relay,
)

__all__ = [
    "AdminServer",
    "ByteStream",
    "ConnectionSet",
    "InboundListener",
    "InboundSpec",
    "NativeInboundListener",
    "NativeOutboundListener",
    "OutboundListener",
    "OutboundSpec",
    "ProxyMetrics",
    "RelayResult",
    "UnixStream",
    "bind_unix_socket",
    "connect_unix",
    "relay",
]
