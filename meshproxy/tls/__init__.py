"""TLS backend selection and context building.

``MESHPROXY_NATIVE=auto|require|off`` chooses the backend. Only the Python backend
(stdlib ``ssl`` on uvloop) relays today; the compiled module ``meshproxy._native_tls``
exists but exports no engine yet (``ENGINE_API == 0``), so ``require`` fails closed rather
than running on the Python backend in silence.
"""

from __future__ import annotations

import os
from types import ModuleType

from meshproxy.errors import ConfigError, NativeUnavailable
from meshproxy.tls._python import (
    CHUNK,
    TLSIdentity,
    TLSStream,
    client_context,
    connect,
    describe_error,
    server_context,
)

__all__ = [
    "CHUNK",
    "TLSIdentity",
    "TLSStream",
    "client_context",
    "connect",
    "describe_backend",
    "describe_error",
    "native_module",
    "select_backend",
    "server_context",
]

_MODES = ("auto", "require", "off")


def native_module() -> ModuleType | None:
    """The compiled module, or None when it was not built."""
    try:
        from meshproxy import _native_tls
    except ImportError:
        return None
    return _native_tls


def describe_backend() -> str:
    """The active backend in one line, for the start-up log and the metrics label."""
    native = native_module()
    if native is None:
        state = "native module missing"
    else:
        state = f"native module loaded: {native.openssl_version()}"
    return f"python (stdlib ssl on uvloop); {state}"


def select_backend(mode: str | None = None) -> str:
    """The backend to run (``"python"``); refuses ``require`` while no engine exists."""
    mode = os.environ.get("MESHPROXY_NATIVE", "auto") if mode is None else mode
    if mode not in _MODES:
        raise ConfigError(f"MESHPROXY_NATIVE={mode!r}: must be one of {', '.join(_MODES)}")
    if mode == "require":
        native = native_module()
        if native is None:
            raise NativeUnavailable(
                "MESHPROXY_NATIVE=require but meshproxy._native_tls is not built "
                "(install meshproxy with pip to compile it)"
            )
        if native.ENGINE_API < 1:
            raise NativeUnavailable(
                "MESHPROXY_NATIVE=require but the native TLS engine is not implemented yet "
                f"(ENGINE_API {native.ENGINE_API}); use MESHPROXY_NATIVE=auto or off"
            )
    return "python"
