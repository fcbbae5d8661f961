"""A listener's ``tls:`` options on both backends, checked with ``openssl s_client``:
TLS 1.3 only and no session tickets by default; 1.2 and tickets only when configured."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import uvloop

from meshproxy import pki
from meshproxy.config._marble import TLSConfig
from meshproxy.proxy import ConnectionSet, InboundListener, InboundSpec
from meshproxy.proxy._native import NativeInboundListener
from meshproxy.tls import (
    NativeEngine,
    TLSIdentity,
    client_context,
    native_module,
    native_server_context,
    server_context,
)

DOMAIN = "mesh.local"
BACKENDS = os.environ.get("MESHPROXY_TEST_BACKENDS", "py,c").split(",")
PING = b"ping-through-the-listener\n"


@pytest.fixture(scope="module")
def identity() -> TLSIdentity:
    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    inter = pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())
    key = pki.generate_key()
    cert = pki.issue_leaf(
        inter, pki.make_csr(key, "backend", ["localhost"]), trust_domain=DOMAIN,
        marble_type="backend", instance=uuid.uuid4(), dns_names=["localhost"],
        lifetime=timedelta(hours=1), now=now, simulated=True,
    )  # fmt: skip
    return TLSIdentity(
        chain_pem=pki.certs_to_pem([cert, inter.cert]),
        key_pem=pki.key_to_pem(key),
        trust_pem=pki.cert_to_pem(inter.cert),
    )


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mp-tls-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "c" and native_module() is None:
        pytest.fail("meshproxy._native_tls is not built: pip install -e . compiles it")
    return str(request.param)


def s_client(port: int, *flags: str) -> tuple[bool, str]:
    """Connect, send a line, wait for its echo; (echoed, s_client's whole output)."""
    with subprocess.Popen(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         *flags],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    ) as proc:  # fmt: skip
        assert proc.stdin is not None
        assert proc.stdout is not None
        out, echoed = b"", False
        try:
            proc.stdin.write(PING)
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # s_client is gone already: the handshake failed
        for line in proc.stdout:  # ends at EOF when the handshake fails
            out += line
            if line == PING:
                echoed = True
                break
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()  # s_client closes the connection at the end of its input
        out += proc.stdout.read()
        proc.wait(20)
    return echoed, out.decode(errors="replace")


def probe(
    identity: TLSIdentity, workdir: Path, backend: str, tls: TLSConfig, *flags: str
) -> tuple[bool, str]:
    """A public inbound listener with ``tls`` options in front of an echo app; s_client."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def scenario() -> tuple[bool, str]:
        app_socket = workdir / "app.sock"
        app = await asyncio.start_unix_server(echo, path=str(app_socket))
        spec = InboundSpec("api", "127.0.0.1", 0, "public", (), DOMAIN, app_socket)
        connections = ConnectionSet()
        version, tickets = tls.min_version, tls.session_tickets
        engine = NativeEngine(threads=1) if backend == "c" else None
        listener: InboundListener | NativeInboundListener
        if engine is not None:
            ctx = native_server_context(
                identity, client_auth=False, min_version=version, tickets=tickets
            )
            listener = NativeInboundListener(spec, ctx, engine, connections)
        else:
            pctx = server_context(identity, client_auth=False, min_version=version, tickets=tickets)
            listener = InboundListener(spec, pctx, connections)
        _, port = await listener.start()
        try:
            return await asyncio.to_thread(s_client, port, *flags)
        finally:
            listener.stop_accepting()
            await connections.drain(2.0)
            if engine is not None:
                await engine.aclose()
            app.close()

    return uvloop.run(scenario())


def tickets(output: str) -> int:
    """Session tickets s_client received (TLS 1.3 post-handshake, or 1.2's)."""
    return output.count("Post-Handshake New Session Ticket arrived") + output.count(
        "TLS session ticket lifetime hint"
    )


def test_default_is_tls13_only_without_tickets(
    identity: TLSIdentity, workdir: Path, backend: str
) -> None:
    ok, out = probe(identity, workdir, backend, TLSConfig())
    assert ok, out
    assert "TLSv1.3" in out
    assert tickets(out) == 0, out
    ok12, out12 = probe(identity, workdir, backend, TLSConfig(), "-tls1_2")
    assert not ok12
    assert "alert protocol version" in out12, out12


def test_tls12_is_accepted_when_configured(
    identity: TLSIdentity, workdir: Path, backend: str
) -> None:
    tls = TLSConfig(min_version="1.2")
    ok, out = probe(identity, workdir, backend, tls, "-tls1_2")
    assert ok, out
    assert "Protocol  : TLSv1.2" in out
    assert "ECDHE" in out  # forward secret key exchange only
    assert tickets(out) == 0, out
    ok13, out13 = probe(identity, workdir, backend, tls)
    assert ok13, out13
    assert "TLSv1.3" in out13  # 1.3 stays the preferred version


def test_session_tickets_only_when_configured(
    identity: TLSIdentity, workdir: Path, backend: str
) -> None:
    ok, out = probe(identity, workdir, backend, TLSConfig(session_tickets=True))
    assert ok, out
    assert tickets(out) >= 1, out
    ok12, out12 = probe(
        identity, workdir, backend, TLSConfig(min_version="1.2", session_tickets=True), "-tls1_2"
    )
    assert ok12, out12
    assert tickets(out12) == 1, out12


def test_client_contexts_follow_the_same_options(identity: TLSIdentity) -> None:
    import ssl

    default = client_context(identity)
    assert default.minimum_version == ssl.TLSVersion.TLSv1_3
    assert default.options & ssl.OP_NO_TICKET
    relaxed = client_context(identity, min_version="1.2", tickets=True)
    assert relaxed.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not relaxed.options & ssl.OP_NO_TICKET
    with pytest.raises(ValueError, match=r"min_version must be 1\.2 or 1\.3"):
        client_context(identity, min_version="1.1")


def test_the_marble_config_reads_and_checks_tls(tmp_path: Path) -> None:
    import yaml

    from meshproxy.config import load_marble_config
    from meshproxy.errors import ConfigError

    def load(inbound_tls: object, outbound_tls: object = None) -> tuple[TLSConfig, TLSConfig]:
        doc = {
            "coordinator": {"address": "127.0.0.1:2001"},
            "marble": {"type": "backend"},
            "attestation": {"provider": "simulation", "enclave": "e.json"},
            "workdir": "run",
            "inbound": [{"name": "api", "listen": "127.0.0.1:8443", "tls": inbound_tls}],
            "outbound": [{"name": "db", "upstream": "127.0.0.1:6443", "peer": "db",
                          "tls": outbound_tls}],
        }  # fmt: skip
        path = tmp_path / "marble.yaml"
        path.write_text(yaml.safe_dump(doc))
        cfg = load_marble_config(path)
        return cfg.inbound[0].tls, cfg.outbound[0].tls

    assert load(None) == (TLSConfig("1.3", False), TLSConfig("1.3", False))
    # unquoted 1.2 is a YAML number: taken as the version it spells
    assert load({"min_version": 1.2}, {"min_version": "1.2", "session_tickets": True}) == (
        TLSConfig("1.2", False),
        TLSConfig("1.2", True),
    )
    with pytest.raises(ConfigError, match=r"inbound\[0\]\.tls\.min_version: must be one of"):
        load({"min_version": "1.1"})
    with pytest.raises(ConfigError, match=r"outbound\[0\]\.tls: unknown key 'tickets'"):
        load(None, {"tickets": True})


def test_meshproxy_runs_listeners_with_the_configured_options(
    identity: TLSIdentity, workdir: Path, backend: str
) -> None:
    """The runtime's wiring: ``tls:`` of a marble config reaches the listener it names."""
    import yaml

    from meshproxy.config import load_marble_config
    from meshproxy.runtime._main import RunPlan, _listeners

    doc = {
        "coordinator": {"address": "127.0.0.1:2001"},
        "marble": {"type": "backend"},
        "attestation": {"provider": "simulation", "enclave": "e.json"},
        "workdir": str(workdir),
        "inbound": [
            {"name": "old", "listen": "127.0.0.1:0", "clients": "public",
             "tls": {"min_version": "1.2", "session_tickets": True}},
            {"name": "new", "listen": "127.0.0.1:0", "clients": "public"},
        ],
    }  # fmt: skip
    (workdir / "marble.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_marble_config(workdir / "marble.yaml")
    plan = RunPlan(config=cfg, argv=("true",), env={}, identity=identity,
                   trust_domain=DOMAIN, allow={})  # fmt: skip

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def scenario() -> dict[str, tuple[tuple[bool, str], tuple[bool, str]]]:
        apps = [await asyncio.start_unix_server(echo, path=str(cfg.inbound_socket(n)))
                for n in ("old", "new")]  # fmt: skip
        connections = ConnectionSet()
        engine = NativeEngine(threads=1) if backend == "c" else None
        inbound, _ = _listeners(plan, connections, None, engine)
        out = {}
        try:
            for li in inbound:
                _, port = await li.start()
                out[li.spec.name] = (
                    await asyncio.to_thread(s_client, port, "-tls1_2"),
                    await asyncio.to_thread(s_client, port),
                )
        finally:
            for li in inbound:
                li.stop_accepting()
            await connections.drain(2.0)
            if engine is not None:
                await engine.aclose()
            for app in apps:
                app.close()
        return out

    got = uvloop.run(scenario())
    (old12, out12), (old13, out13) = got["old"]
    assert old12, out12
    assert tickets(out12) == 1, out12
    assert old13, out13
    assert tickets(out13) >= 1, out13
    (new12, _), (new13, out) = got["new"]
    assert not new12
    assert new13, out
    assert tickets(out) == 0, out
