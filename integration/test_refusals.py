"""Every refusal of the mesh, each with its reason in a log (fail closed, say why)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import APPS, Mesh, package, port
from integration.harness import wait_for

ECHO = [sys.executable, str(APPS / "echo.py")]
PRODUCT = 1  # marble_config signs ProductID 1 unless told otherwise


def manifest(mesh: Mesh) -> dict[str, Any]:
    return {
        "Packages": {"app": package(mesh.signer, PRODUCT, svn=2)},
        "Marbles": {
            "server": {"Package": "app"},
            "client": {"Package": "app"},
            "intruder": {"Package": "app"},
            "decoy": {"Package": "app"},
            "single": {"Package": "app", "MaxActivations": 1},
        },
        "Mesh": {
            "TrustDomain": "refusals.test",
            "Allow": {"server": ["client"], "decoy": ["client", "intruder"]},
        },
    }


def refused_activation(mesh: Mesh, name: str, marble_type: str, **kw: Any) -> str:
    app = [*ECHO, "UNUSED"]
    kw.setdefault("svn", 2)
    kw.setdefault("product_id", PRODUCT)
    cfg = mesh.marble_config(name, marble_type, app=app, activation_timeout="2s", **kw)
    proc = mesh.start(name, cfg, app, wait=False)
    code = proc.popen.wait(60)
    out = proc.log.read_text()
    assert code != 0, out
    assert "Traceback" not in out
    return out


@pytest.fixture
def refusals(mesh: Mesh) -> Mesh:
    mesh.set_manifest(manifest(mesh))
    return mesh


def test_unknown_marble_type_is_refused(refusals: Mesh) -> None:
    out = refused_activation(refusals, "ghost", "ghost")
    assert "unknown marble type 'ghost'" in out
    coord = refusals.c.procs[0].log.read_text()
    assert "activation refused" in coord
    assert "unknown marble type 'ghost'" in coord


def test_security_version_below_the_package_minimum_is_refused(refusals: Mesh) -> None:
    out = refused_activation(refusals, "old", "client", svn=1)
    assert "SecurityVersion 1 is below" in out


def test_debug_enclave_is_refused_when_the_package_says_debug_false(refusals: Mesh) -> None:
    out = refused_activation(refusals, "dbg", "client", debug=True)
    assert "debug" in out.lower()
    assert "could not activate" in out


def test_max_activations_is_enforced(refusals: Mesh) -> None:
    app = [*ECHO, "MESHPROXY_INBOUND_E"]
    first = refusals.marble_config(
        "single1",
        "single",
        app=app,
        svn=2,
        inbound=[{"name": "e", "listen": f"127.0.0.1:{port()}", "clients": "marbles"}],
    )
    refusals.start("single1", first, app)
    out = refused_activation(refusals, "single2", "single")
    assert "MaxActivations (1)" in out


def _connect_and_probe(sock_path: str) -> bytes:
    """Connect through an outbound socket; return what came back (b'' when cut off)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        try:
            s.sendall(b"probe\n")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data
        except OSError:
            return b""


def _idle_app() -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(3600)"]


def test_inbound_refuses_a_marble_type_the_mesh_does_not_allow(refusals: Mesh) -> None:
    server_port = port()
    app = [*ECHO, "MESHPROXY_INBOUND_E"]
    server = refusals.marble_config(
        "server",
        "server",
        app=app,
        svn=2,
        inbound=[{"name": "e", "listen": f"127.0.0.1:{server_port}", "clients": "marbles"}],
    )
    srv = refusals.start("server", server, app)
    outbound = [{"name": "up", "upstream": f"127.0.0.1:{server_port}", "peer": "server"}]
    good = refusals.marble_config(
        "client", "client", app=_idle_app(), svn=2, product_id=PRODUCT, outbound=outbound
    )
    bad = refusals.marble_config(
        "intruder", "intruder", app=_idle_app(), svn=2, product_id=PRODUCT, outbound=outbound
    )
    c1 = refusals.start("client", good, _idle_app())
    c2 = refusals.start("intruder", bad, _idle_app())
    assert _connect_and_probe(c1.info["outbound"]["up"]) == b"probe\n"
    assert _connect_and_probe(c2.info["outbound"]["up"]) == b""

    def refused() -> list[dict[str, Any]]:
        return [e for e in srv.log_events() if e.get("event") == "inbound.refused"]

    events = wait_for(refused, 10, "the server's refusal log line")
    assert "spiffe://refusals.test/marble/intruder" in events[0]["reason"]
    assert "not allowed" in events[0]["reason"]


def test_outbound_refuses_a_server_that_proves_another_marble_type(refusals: Mesh) -> None:
    decoy_port = port()
    app = [*ECHO, "MESHPROXY_INBOUND_E"]
    decoy = refusals.marble_config(
        "decoy",
        "decoy",
        app=app,
        svn=2,
        inbound=[{"name": "e", "listen": f"127.0.0.1:{decoy_port}", "clients": "marbles"}],
    )
    refusals.start("decoy", decoy, app)
    # The client believes it talks to a "server", but the port belongs to a decoy marble.
    outbound = [{"name": "up", "upstream": f"127.0.0.1:{decoy_port}", "peer": "server"}]
    cfg = refusals.marble_config(
        "client", "client", app=_idle_app(), svn=2, product_id=PRODUCT, outbound=outbound
    )
    client = refusals.start("client", cfg, _idle_app())
    assert _connect_and_probe(client.info["outbound"]["up"]) == b""

    def refused() -> list[dict[str, Any]]:
        return [e for e in client.log_events() if e.get("event") == "outbound.refused"]

    events = wait_for(refused, 10, "the client's refusal log line")
    assert "decoy" in events[0]["reason"]


def test_no_private_key_appears_in_any_log(refusals: Mesh) -> None:
    test_inbound_refuses_a_marble_type_the_mesh_does_not_allow(refusals)
    time.sleep(0.2)
    logs = list(Path(refusals.c.logs).glob("*.log"))
    assert len(logs) >= 4
    for log in logs:
        text = log.read_text(errors="replace")
        assert "PRIVATE KEY" not in text, log
        assert "MARBLE_PREDEFINED_PRIVATE_KEY=" not in text, log
