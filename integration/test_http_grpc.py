"""grpcio client and server, nobody's code but grpc's, through two real meshproxy processes.

    test (grpcio client) --h2c unix--> frontend marble's outbound --mTLS h2--> backend
    marble's inbound (protocol: http, app_protocol: h2c) --h2c unix--> grpc_probe.py

One cluster for the module (a coordinator and two marbles); each test is one kind of call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from integration.conftest import APPS, Mesh, Signer, package, port
from integration.harness import Cluster, Proc, wait_for

grpc = pytest.importorskip("grpc")

DOMAIN = "grpc.test"
SERVER_APP = [sys.executable, str(APPS / "grpc_probe.py"), "MESHPROXY_INBOUND_GRPC"]
IDLE_APP = [sys.executable, "-c", "import signal; signal.pause()"]


@dataclass
class Topology:
    mesh: Mesh
    backend: Proc
    frontend: Proc
    channel: Any

    def call(self, method: str, request: bytes, **kw: Any) -> Any:
        fn = self.channel.unary_unary(f"/probe.Probe/{method}")
        return fn(request, **kw)

    def metrics(self) -> str:
        admin = self.backend.info["admin"]
        out = subprocess.run(
            ["curl", "-sS", "--unix-socket", admin, "http://admin/metrics"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout


@pytest.fixture(scope="module")
def grpc_mesh(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Iterator[Topology]:
    with Cluster(tmp_path_factory.mktemp("grpc")) as cluster:
        cluster.start_coordinator()
        mesh = Mesh(cluster, signer)
        mesh.set_manifest(
            {
                "Packages": {"p": package(signer, 1)},
                "Marbles": {"backend": {"Package": "p"}, "frontend": {"Package": "p"}},
                "Mesh": {
                    "TrustDomain": DOMAIN,
                    "Allow": {"backend": ["frontend"]},
                    "Routes": {
                        "backend": [
                            {"Path": "/probe.Probe/Manifest", "Allow": []},
                            {"PathPrefix": "/", "Allow": ["frontend"]},
                        ]
                    },
                },
            }
        )
        backend_port = port()
        backend_cfg = mesh.marble_config(
            "backend",
            "backend",
            app=SERVER_APP,
            inbound=[
                {
                    "name": "grpc",
                    "listen": f"127.0.0.1:{backend_port}",
                    "protocol": "http",
                    "app_protocol": "h2c",
                    "routes": [
                        {"path": "/probe.Probe/Denied", "allow": []},
                        {"path_prefix": "/probe.Probe", "allow": ["frontend"]},
                    ],
                }
            ],
        )
        frontend_cfg = mesh.marble_config(
            "frontend",
            "frontend",
            app=IDLE_APP,
            outbound=[
                {
                    "name": "backend",
                    "upstream": f"127.0.0.1:{backend_port}",
                    "peer": "backend",
                    "sni": "backend.test.local",
                    "protocol": "http",
                }
            ],
        )
        backend = mesh.start("backend", backend_cfg, SERVER_APP)
        wait_for(lambda: "grpc probe serving" in backend.log.read_text(), 30, "grpc server")
        frontend = mesh.start("frontend", frontend_cfg, IDLE_APP)
        socket = frontend.info["outbound"]["backend"]
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
        channel = grpc.insecure_channel(f"unix:{socket}", options=options)
        try:
            yield Topology(mesh, backend, frontend, channel)
        finally:
            channel.close()


def test_unary_call_carries_the_callers_verified_identity_to_the_server(
    grpc_mesh: Topology,
) -> None:
    reply = grpc_mesh.call(
        "Echo",
        b"ping",
        metadata=[("l5d-client-id", "admin.grpc.test"), ("x-forwarded-client-cert", "URI=evil")],
        timeout=10,
    )
    body, _, who = reply.partition(b"|")
    assert body == b"ping"
    ident = json.loads(who)
    assert ident["l5d-client-id"] == "frontend.grpc.test"
    assert ident["x-forwarded-client-cert"].startswith("By=spiffe://grpc.test/marble/backend;Hash=")
    assert ident["x-forwarded-client-cert"].endswith(";URI=spiffe://grpc.test/marble/frontend")
    assert ident["forwarded"] == "for=_frontend;proto=https"


def test_server_streaming_delivers_every_message_in_order(grpc_mesh: Topology) -> None:
    stream = grpc_mesh.channel.unary_stream("/probe.Probe/Count")
    assert list(stream(b"500", timeout=20)) == [str(i).encode() for i in range(500)]


def test_client_streaming_sums_what_was_sent(grpc_mesh: Topology) -> None:
    sum_ = grpc_mesh.channel.stream_unary("/probe.Probe/Sum")
    chunks = [b"x" * (i * 1000) for i in range(200)]
    assert sum_(iter(chunks), timeout=30) == str(sum(map(len, chunks))).encode()


def test_an_8_mib_message_crosses_both_ways(grpc_mesh: Topology) -> None:
    payload = bytes(range(256)) * (32 * 1024)
    reply = grpc_mesh.call("Echo", payload, timeout=30)
    assert reply[: len(payload)] == payload


def test_deadline_exceeded_reaches_the_client_and_cancels_the_server(grpc_mesh: Topology) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        grpc_mesh.call("Slow", b"", timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    wait_for(lambda: "slow cancelled" in grpc_mesh.backend.log.read_text(), 10, "server cancel")


def test_status_details_and_trailing_metadata_are_preserved(grpc_mesh: Topology) -> None:
    with pytest.raises(grpc.RpcError) as err:
        grpc_mesh.call("Fail", b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "nope"
    assert ("x-why", "test") in tuple(err.value.trailing_metadata())


def test_a_method_the_route_rules_deny_is_permission_denied_and_never_reaches_the_app(
    grpc_mesh: Topology,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        grpc_mesh.call("Denied", b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "does not allow marble type 'frontend'" in err.value.details()
    grpc_mesh.call("Echo", b"after", timeout=10)  # the server has handled later calls...
    assert "denied reached" not in grpc_mesh.backend.log.read_text()  # ...but never Denied
    events = [e for e in grpc_mesh.backend.log_events() if e.get("event") == "http.refused"]
    assert events[-1]["path"] == "/probe.Probe/Denied"
    assert events[-1]["peer"] == "spiffe://grpc.test/marble/frontend"


def test_the_manifests_route_rules_reach_the_marble(grpc_mesh: Topology) -> None:
    with pytest.raises(grpc.RpcError) as err:
        grpc_mesh.call("Manifest", b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_requests_are_counted_by_listener_peer_status_and_grpc_status(
    grpc_mesh: Topology,
) -> None:
    grpc_mesh.call("Echo", b"count me", timeout=10)
    with pytest.raises(grpc.RpcError):
        grpc_mesh.call("Fail", b"", timeout=10)
    peer = 'client_id="spiffe://grpc.test/marble/frontend"'

    def counted() -> tuple[str, list[str]]:
        text = grpc_mesh.metrics()
        lines = [ln for ln in text.splitlines() if ln.startswith("response_total{") and peer in ln]
        return text, lines

    # The native HTTP/2 fast path reports a busy connection's counters at most once a
    # second (native_tls/README.md): poll briefly.
    deadline = time.monotonic() + 5
    text, lines = counted()
    while time.monotonic() < deadline and not any('grpc_status="5"' in ln for ln in lines):
        time.sleep(0.1)
        text, lines = counted()
    assert any('grpc_status="0"' in ln and 'classification="success"' in ln for ln in lines)
    assert any('grpc_status="5"' in ln and 'classification="failure"' in ln for ln in lines)
    assert any(
        ln.startswith("request_total{") and 'listener="grpc"' in ln and peer in ln
        for ln in text.splitlines()
    )
    assert "meshproxy_tls_backend_info{backend=" in text
