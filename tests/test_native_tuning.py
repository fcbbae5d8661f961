"""The engine's performance features, observed on a real relay instead of only in benchmarks.

* EC keys on OpenSSL's built-in EC method (native_tls/context.c, ``legacy_ec``): the
  module reports whether it is installed and how often OpenSSL took it
  (``_native_tls.ec_method()``); the handshakes of a mesh relay must move that counter.
* ``SO_SNDBUF`` of the engine's end of an app Unix socket (``APP_SNDBUF``, 1 MiB) and
  ``TCP_NOTSENT_LOWAT`` of its TLS sockets (``TCP_UNSENT_LOWAT``, 32 KiB): the engine runs
  in this process, so the test finds its sockets in ``/proc/self/fd`` by their addresses
  and reads the options with ``getsockopt`` on a duplicate of each.

The topology is the mesh of ``test_native_engine.py`` (app -> native outbound -> mTLS ->
native inbound -> app): both TLS ends are the engine, no stdlib ``ssl`` in the path.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from test_native_engine import (  # the engine harness and its PKI fixtures
    DOMAIN,
    Scene,
    ca,  # noqa: F401  (a fixture ``ids`` depends on)
    echo,
    eventually,
    ids,  # noqa: F401
    pytestmark,  # noqa: F401  (the same condition as the engine's tests)
    run,
    workdir,  # noqa: F401
)

from meshproxy.proxy import OutboundSpec
from meshproxy.proxy._native import NativeOutboundListener
from meshproxy.tls import TLSIdentity, describe_backend, native_client_context, native_module

APP_SNDBUF = 1 << 20  # native_tls/engine.c
TCP_UNSENT_LOWAT = 32 * 1024  # native_tls/engine.c


def ec_method() -> tuple[bool, int]:
    native = native_module()
    assert native is not None, "the native module is not built"
    installed, uses = native.ec_method()
    return bool(installed), int(uses)


async def round_trip(
    out: Path, payload: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(out))
    writer.write(payload)
    assert await reader.readexactly(len(payload)) == payload
    return reader, writer


# -- the built-in EC method -----------------------------------------------------------------
def test_mesh_handshakes_run_certificate_keys_on_the_built_in_ec_method(
    ids: dict[str, TLSIdentity],  # noqa: F811
    workdir: Path,  # noqa: F811
) -> None:
    """Both ends are the engine, and they agree on X25519 (no EC key exchange): the EC
    operations counted are the certificate keys' (CertificateVerify signed and checked on
    each end). OpenSSL asks the built-in method only for EC keys decoded on the legacy
    path, so a moving counter means the certificates' keys skipped the decoder chain."""
    installed, _ = ec_method()
    assert installed, "OpenSSL's built-in EC method is not installed (context.c, legacy_ec)"
    assert "EC keys on OpenSSL's built-in EC method" in describe_backend()
    moved: list[int] = []

    async def scenario(scene: Scene) -> None:
        out = await scene.mesh(workdir, ids, echo)  # the contexts: before the first count
        for _ in range(3):
            before = ec_method()[1]
            _, writer = await round_trip(out, b"ping")
            moved.append(ec_method()[1] - before)
            writer.close()
            await eventually(lambda: scene.engine.stats()["active"] == 0, "the end")
        assert scene.engine.stats()["handshakes"] == 6  # both ends, three connections

    run(scenario)
    # Each engine end verifies its peer's CertificateVerify with the peer's leaf key.
    assert all(m >= 2 for m in moved), moved


# -- socket options of the engine's own sockets ---------------------------------------------
@dataclass(frozen=True)
class Sock:
    fd: int
    family: int
    local: Any
    peer: Any  # None: not connected
    sndbuf: int
    notsent_lowat: int | None  # TCP sockets only


def sockets() -> list[Sock]:
    """Every socket this process holds, read through a duplicate of its fd."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:  # closed meanwhile (the listing's own fd, for one)
            continue
        with sock:
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
            found.append(Sock(
                fd, sock.family, sock.getsockname(), peer,
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) if tcp else None,
            ))  # fmt: skip
    return found


def sysctl(name: str) -> int:
    return int(Path("/proc/sys/net/core", name).read_text())


def test_the_engines_app_sockets_get_a_wide_send_buffer_and_its_tls_sockets_a_notsent_cap(
    ids: dict[str, TLSIdentity],  # noqa: F811
    workdir: Path,  # noqa: F811
) -> None:
    """A relayed connection through the mesh holds four engine sockets: the outbound's app
    socket (accepted by Python on out.sock, handed over with ``relay``), its TLS socket
    (dialed by Python, handed over with ``handshake``), the inbound's TLS socket (accepted
    by an engine listener) and its app socket (connected to app.sock in C). The test's own
    ends of the same connections are the control: they keep the kernel's defaults."""
    app, out = workdir / "app.sock", workdir / "out.sock"

    async def scenario(scene: Scene) -> None:
        await scene.app(app, echo)
        _, port = await scene.inbound(workdir, ids["backend"])
        spec = OutboundSpec("store", out, "127.0.0.1", port, None, "backend", DOMAIN)
        ctx = native_client_context(ids["frontend"])
        outbound = NativeOutboundListener(spec, ctx, scene.engine, scene.connections)
        await outbound.start()
        scene.closers.append(outbound)
        _, writer = await round_trip(out, b"x" * 100_000)
        seen = [s for s in sockets() if s.peer is not None]  # connected ones
        writer.close()

        tls = [s for s in seen if s.family == socket.AF_INET and port in (s.local[1], s.peer[1])]
        assert len(tls) == 2, seen  # the outbound's and the inbound's
        assert [s.notsent_lowat for s in tls] == [TCP_UNSENT_LOWAT] * 2
        with socket.socket() as fresh:  # the control: a socket nobody tuned
            assert fresh.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 0

        unix = [s for s in seen if s.family == socket.AF_UNIX]
        engine_app = [s for s in unix if str(app) == s.peer or str(out) == s.local]
        own_app = [s for s in unix if str(out) == s.peer or str(app) == s.local]
        assert (len(engine_app), len(own_app)) == (2, 2), seen
        # The kernel doubles what was set, capped by net.core.wmem_max.
        assert [s.sndbuf for s in engine_app] == [2 * min(APP_SNDBUF, sysctl("wmem_max"))] * 2
        assert [s.sndbuf for s in own_app] == [sysctl("wmem_default")] * 2

    run(scenario)
