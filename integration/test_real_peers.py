"""Programs nobody here wrote run as marbles unchanged: redis-server and redis-cli, curl."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from integration.capture import LoopbackCapture
from integration.conftest import APPS, Mesh, package, port


def test_redis_ping_set_get_through_two_proxies_with_no_plaintext_on_the_wire(mesh: Mesh) -> None:
    mesh.set_manifest(
        {
            "Packages": {"redis": package(mesh.signer, 7), "tools": package(mesh.signer, 8)},
            "Marbles": {"db": {"Package": "redis"}, "cli": {"Package": "tools"}},
            "Mesh": {"TrustDomain": "redis.test", "Allow": {"db": ["cli"]}},
        }
    )
    db_port = port()
    server_app = [
        "sh",
        "-c",
        'exec redis-server --port 0 --unixsocket "$MESHPROXY_INBOUND_DB" '
        '--unixsocketperm 700 --save "" --appendonly no',
    ]
    db = mesh.marble_config(
        "db",
        "db",
        app=server_app,
        product_id=7,
        inbound=[{"name": "db", "listen": f"127.0.0.1:{db_port}", "clients": "marbles"}],
    )
    value = f"marker-{uuid.uuid4().hex}"
    cli_script = (
        'set -e; r() { redis-cli -s "$MESHPROXY_OUTBOUND_DB" "$@"; }; '
        f"r PING; r SET demo-key {value}; r GET demo-key"
    )
    cli = mesh.marble_config(
        "cli",
        "cli",
        app=["sh", "-c", cli_script],
        product_id=8,
        outbound=[
            {"name": "db", "upstream": f"127.0.0.1:{db_port}", "peer": "db", "sni": "db.test.local"}
        ],
    )
    with LoopbackCapture(mesh.c.base / "redis.pcap") as cap:
        mesh.start("db", db, server_app)
        client = mesh.start("cli", cli, ["sh", "-c", cli_script], wait=False)
        assert client.popen.wait(60) == 0, client.log.read_text()
    out = client.log.read_text()
    lines = [ln.strip() for ln in out.splitlines() if not ln.startswith("{")]
    assert lines[-3:] == ["PONG", "OK", value], out
    wire = cap.data()
    assert cap.packets() > 10
    assert value.encode() not in wire
    assert b"PONG" not in wire
    assert b"demo-key" not in wire
    db_events = mesh.c.procs[-2].log_events()
    assert any(
        e.get("event") == "inbound.accept" and e.get("peer") == "spiffe://redis.test/marble/cli"
        for e in db_events
    ), db_events


def test_curl_with_the_cluster_root_reaches_a_public_listener_and_without_it_cannot(
    mesh: Mesh,
) -> None:
    mesh.set_manifest(
        {
            "Packages": {"web": package(mesh.signer, 3)},
            "Marbles": {
                "web": {"Package": "web", "Parameters": {"Env": {"WHO": "env-from-manifest"}}}
            },
        }
    )
    web_port = port()
    app = [sys.executable, str(APPS / "http_hello.py"), "MESHPROXY_INBOUND_HTTP", "WHO"]
    cfg = mesh.marble_config(
        "web",
        "web",
        app=app,
        product_id=3,
        inbound=[{"name": "http", "listen": f"127.0.0.1:{web_port}", "clients": "public"}],
    )
    mesh.start("web", cfg, app)
    root = mesh.c.base / "root.pem"
    mesh.c.cli(
        "certificate",
        "root",
        "--coordinator",
        mesh.c.client_addr,
        "--accept-simulation",
        "-o",
        str(root),
    )
    curl = shutil.which("curl") or "curl"
    ok = subprocess.run(
        [
            curl,
            "-sS",
            "--cacert",
            str(root),
            "--resolve",
            f"web.test.local:{web_port}:127.0.0.1",
            f"https://web.test.local:{web_port}/path",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == "hello /path env-from-manifest\n"
    refused = subprocess.run(
        [
            curl,
            "-sS",
            "--resolve",
            f"web.test.local:{web_port}:127.0.0.1",
            f"https://web.test.local:{web_port}/path",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 60, refused  # certificate problem: unknown issuer
    assert "hello" not in refused.stdout


def test_openssl_s_client_without_a_certificate_is_refused_by_a_marbles_listener(
    mesh: Mesh, tmp_path: Path
) -> None:
    mesh.set_manifest(
        {
            "Packages": {"p": package(mesh.signer, 1)},
            "Marbles": {"svc": {"Package": "p"}},
        }
    )
    svc_port = port()
    app = [sys.executable, str(APPS / "echo.py"), "MESHPROXY_INBOUND_ECHO"]
    cfg = mesh.marble_config(
        "svc",
        "svc",
        app=app,
        inbound=[{"name": "echo", "listen": f"127.0.0.1:{svc_port}", "clients": "marbles"}],
    )
    mesh.start("svc", cfg, app)
    root = tmp_path / "root.pem"
    mesh.c.cli(
        "certificate",
        "root",
        "--coordinator",
        mesh.c.client_addr,
        "--accept-simulation",
        "-o",
        str(root),
    )
    res = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{svc_port}",
            "-CAfile",
            str(root),
            "-quiet",
            "-verify_return_error",
        ],
        input="plaintext-probe\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "plaintext-probe" not in res.stdout
    assert res.returncode != 0 or "alert" in res.stderr.lower(), res
