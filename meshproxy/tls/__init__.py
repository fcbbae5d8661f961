"""TLS backend selection and context building.

``MESHPROXY_NATIVE=auto|require|off`` chooses the backend of ``protocol: tcp`` listeners:

* ``native``: the C engine of ``meshproxy._native_tls`` (``ENGINE_API >= 1``) owns the
  TLS sessions and relays bytes on worker threads (``meshproxy.tls._native``);
* ``python``: stdlib ``ssl`` on uvloop (``meshproxy.tls._python``).

``auto`` takes the engine when it loads, else Python; ``require`` fails closed
(``NativeUnavailable``) rather than running on Python in silence; ``off`` forces Python.
The choice is logged at start (``describe_backend``) and readable for metrics
(``active_backend``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

from meshproxy.errors import ConfigError, NativeUnavailable
from meshproxy.tls._native import (
    Closed,
    Handshake,
    NativeEngine,
    NativeSession,
    _translate,
    format_peer,
)
from meshproxy.tls._native import load as load_native
from meshproxy.tls._python import (
    CHUNK,
    TLSIdentity,
    TLSStream,
    client_context,
    connect,
    describe_error,
    server_context,
)

if TYPE_CHECKING:
    from meshproxy._native_tls import Context

__all__ = [
    "CHUNK",
    "Closed",
    "Handshake",
    "NativeEngine",
    "NativeSession",
    "TLSIdentity",
    "TLSStream",
    "active_backend",
    "client_context",
    "connect",
    "describe_backend",
    "describe_error",
    "format_peer",
    "native_client_context",
    "native_module",
    "native_server_context",
    "select_backend",
    "server_context",
]

_MODES = ("auto", "require", "off")
PYTHON = "python"
NATIVE = "native"


@dataclass
class _Selection:
    backend: str | None = None
    detail: str = ""


_selected = _Selection()


def native_module() -> ModuleType | None:
    """The compiled module, or None when it was not built (or is disabled for a test)."""
    if os.environ.get("MESHPROXY_NATIVE_MODULE_DISABLE") == "1":
        return None
    try:
        return importlib.import_module("meshproxy._native_tls")
    except ImportError:
        return None


def select_backend(mode: str | None = None) -> str:
    """Choose the backend (``"native"`` or ``"python"``) for this process and remember it."""
    mode = os.environ.get("MESHPROXY_NATIVE", "auto") if mode is None else mode
    if mode not in _MODES:
        raise ConfigError(f"MESHPROXY_NATIVE={mode!r}: must be one of {', '.join(_MODES)}")
    if mode == "off":
        _selected.backend, _selected.detail = PYTHON, "MESHPROXY_NATIVE=off"
        return PYTHON
    try:
        native = load_native()
    except NativeUnavailable as exc:
        if mode == "require":
            raise NativeUnavailable(f"MESHPROXY_NATIVE=require but {exc}") from None
        _selected.backend, _selected.detail = PYTHON, _why_not(exc)
        return PYTHON
    _selected.backend = NATIVE
    _selected.detail = f"meshproxy._native_tls ENGINE_API {native.ENGINE_API}"
    return NATIVE


def active_backend() -> str:
    """The backend this process runs (``"native"`` or ``"python"``), for metrics labels."""
    if _selected.backend is None:
        select_backend()
    assert _selected.backend is not None
    return _selected.backend


def describe_backend() -> str:
    """The active backend in one line, for the start-up log."""
    backend = active_backend()
    native = native_module()
    version = native.openssl_version() if native is not None else None
    if backend == NATIVE:
        return f"native (C engine on {version}; {_ec_keys(native)}; {_selected.detail})"
    state = "native module missing" if native is None else f"native module loaded: {version}"
    return f"python (stdlib ssl on uvloop); {state}; {_selected.detail}"


def _ec_keys(native: ModuleType | None) -> str:
    """Where the engine's EC certificate keys run (native_tls/context.c, legacy_ec)."""
    if native is not None and native.ec_method()[0]:
        return "EC keys on OpenSSL's built-in EC method"
    return "EC keys on the providers (built-in EC method not installed)"


def _why_not(exc: NativeUnavailable) -> str:
    return f"MESHPROXY_NATIVE=auto, native engine unavailable: {exc}"


# -- native contexts with the listener's TLS options ------------------------------------------
# (``tls._native``'s builders have no version/ticket options yet; the engine's Context has.)
def native_server_context(
    identity: TLSIdentity,
    *,
    client_auth: bool,
    min_version: str = "1.3",
    tickets: bool = False,
    alpn: Sequence[str] = (),
) -> Context:
    """A listener's native context: mTLS against the intermediate, or public; ``alpn``:
    the protocols it selects from (an HTTP listener's ``h2``, ``http/1.1``)."""
    if any(p.lower().startswith("istio") for p in alpn):
        raise ValueError("istio ALPN values are never used")
    return _native_context(identity, server=True, verify_peer=client_auth, alpn=alpn,
                           min_version=min_version, tickets=tickets)  # fmt: skip


def native_client_context(
    identity: TLSIdentity,
    *,
    alpn: Sequence[str] = (),
    min_version: str = "1.3",
    tickets: bool = False,
) -> Context:
    """An outbound native context; ``pki.check_peer`` checks the identity after it."""
    if any(p.lower().startswith("istio") for p in alpn):
        raise ValueError("istio ALPN values must never be offered")
    return _native_context(identity, server=False, verify_peer=True, alpn=alpn,
                           min_version=min_version, tickets=tickets)  # fmt: skip


def _native_context(
    identity: TLSIdentity,
    *,
    server: bool,
    verify_peer: bool,
    alpn: Sequence[str],
    min_version: str,
    tickets: bool,
) -> Context:
    native = load_native()
    key = bytearray(identity.key_pem.reveal())  # a private copy, wiped by the constructor
    try:
        with _translate("context", native):
            ctx: Context = native.Context(
                identity.chain_pem, key, identity.trust_pem, server=server,
                verify_peer=verify_peer, alpn=tuple(alpn), min_version=min_version,
                tickets=tickets,
            )  # fmt: skip
    finally:
        key[:] = bytes(len(key))  # already wiped in C; again in case the call failed early
    return ctx
