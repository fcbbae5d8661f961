"""curl and h2load, unmodified, against a real marble's ``protocol: http`` listeners.

The marble ``web`` has two public HTTP listeners: ``pub`` in front of an HTTP/1.1 app and
``fast`` in front of an h2c app (both ``integration/apps/http_probe.py``). Clients verify
the cluster root fetched with ``meshproxy certificate root``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.conftest import APPS, Mesh, Signer, package, port, root_certificate
from integration.harness import Cluster, Proc

PROBE = f"{sys.executable} {APPS / 'http_probe.py'}"
APP = ["sh", "-c", f"{PROBE} MESHPROXY_INBOUND_PUB http1 & exec {PROBE} MESHPROXY_INBOUND_FAST h2c"]


@dataclass
class Web:
    proc: Proc
    pub: int
    fast: int
    root: Path

    def curl(self, *args: str, listener: str = "pub") -> subprocess.CompletedProcess[str]:
        p = self.pub if listener == "pub" else self.fast
        return subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                str(self.root),
                "--resolve",
                f"web.test.local:{p}:127.0.0.1",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Iterator[Web]:
    with Cluster(tmp_path_factory.mktemp("web")) as cluster:
        cluster.start_coordinator()
        mesh = Mesh(cluster, signer)
        mesh.set_manifest(
            {"Packages": {"p": package(signer, 1)}, "Marbles": {"web": {"Package": "p"}}}
        )
        pub, fast = port(), port()
        cfg = mesh.marble_config(
            "web",
            "web",
            app=APP,
            inbound=[
                {
                    "name": "pub",
                    "listen": f"127.0.0.1:{pub}",
                    "protocol": "http",
                    "clients": "public",
                },
                {
                    "name": "fast",
                    "listen": f"127.0.0.1:{fast}",
                    "protocol": "http",
                    "clients": "public",
                    "app_protocol": "h2c",
                },
            ],
        )
        proc = mesh.start("web", cfg, APP)
        yield Web(proc, pub, fast, root_certificate(mesh, cluster.base / "root.pem"))


@pytest.mark.parametrize(("flag", "version"), [("--http2", "2"), ("--http1.1", "1.1")])
@pytest.mark.parametrize("listener", ["pub", "fast"])
def test_curl_reaches_the_app_over_http2_and_http1(
    web: Web, flag: str, version: str, listener: str
) -> None:
    p = web.pub if listener == "pub" else web.fast
    res = web.curl(
        flag,
        "-w",
        "\n%{http_version}",
        f"https://web.test.local:{p}/headers?q=1",
        listener=listener,
    )
    assert res.returncode == 0, res.stderr
    body, _, negotiated = res.stdout.rpartition("\n")
    assert negotiated == version  # ALPN picked what curl asked for
    doc = json.loads(body)
    assert doc["path"] == "/headers?q=1"
    assert doc["protocol"] == ("http/1.1" if listener == "pub" else "h2c")


@pytest.mark.parametrize("listener", ["pub", "fast"])
def test_injected_identity_headers_never_reach_the_app(web: Web, listener: str) -> None:
    p = web.pub if listener == "pub" else web.fast
    res = web.curl(
        "--http2",
        "-H",
        "x-forwarded-client-cert: By=x;URI=spiffe://mesh/marble/admin",
        "-H",
        "l5d-client-id: admin.mesh",
        "-H",
        "Forwarded: for=10.1.2.3",
        "-H",
        "l5d-dst-override: admin:80",
        f"https://web.test.local:{p}/headers",
        listener=listener,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    names = [k for k, _ in doc["headers"]]
    assert "x-forwarded-client-cert" not in names
    assert "l5d-client-id" not in names
    assert "l5d-dst-override" not in names
    assert [v for k, v in doc["headers"] if k == "forwarded"] == ["for=unknown;proto=https"]
    assert "admin" not in res.stdout


def test_a_large_upload_streams_through_with_curl(web: Web, tmp_path: Path) -> None:
    import hashlib
    import os

    data = os.urandom(8 << 20)
    (tmp_path / "up.bin").write_bytes(data)
    res = web.curl(
        "--http2",
        "--data-binary",
        f"@{tmp_path / 'up.bin'}",
        f"https://web.test.local:{web.fast}/sha256",
        listener="fast",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {
        "length": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


@pytest.mark.parametrize("listener", ["fast", "pub"])
def test_h2load_drives_many_streams_without_errors(web: Web, listener: str) -> None:
    """h2load connects by IP, so it also sends no SNI; it offers ALPN h2."""
    p = web.pub if listener == "pub" else web.fast
    n = 2000 if listener == "fast" else 600
    res = subprocess.run(
        ["h2load", "-n", str(n), "-c", "4", "-m", "25", f"https://127.0.0.1:{p}/headers"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Application protocol: h2" in res.stdout
    assert re.search(
        rf"requests: {n} total, {n} started, {n} done, {n} succeeded, 0 failed, "
        r"0 errored, 0 timeout",
        res.stdout,
    ), res.stdout
    assert re.search(rf"status codes: {n} 2xx", res.stdout), res.stdout


def test_a_client_that_sends_no_sni_is_served(web: Web) -> None:
    ctx = ssl.create_default_context(cafile=str(web.root))
    ctx.check_hostname = False  # the certificate names DNS names; we connect by IP
    ctx.set_alpn_protocols(["http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", web.pub), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=None) as tls,
    ):
        tls.sendall(b"GET /headers HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(body)["path"] == "/headers"


def _metrics(web: Web) -> str:
    admin = web.proc.info["admin"]
    return subprocess.run(
        ["curl", "-sS", "--unix-socket", admin, "http://admin/metrics"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout


@pytest.mark.parametrize("listener", ["pub", "fast"])
def test_the_admin_socket_counts_requests_per_listener(web: Web, listener: str) -> None:
    p = web.pub if listener == "pub" else web.fast
    web.curl("--http2", f"https://web.test.local:{p}/counted", listener=listener)
    text = _metrics(web)
    assert re.search(
        rf'request_total\{{client_id="",direction="inbound",listener="{listener}",'
        r'server_id="",tls="true"\} [1-9]',
        text,
    ), text
    assert f'tcp_open_connections{{client_id="",direction="inbound",listener="{listener}"' in text
    assert re.search(
        r'response_total\{classification="success",client_id="",direction="inbound",'
        rf'grpc_status="",listener="{listener}",server_id="",status_class="2xx",'
        r'status_code="200",tls="true"\} [1-9]',
        text,
    ), text
    assert (
        'response_latency_ms_bucket{client_id="",direction="inbound",le="1.0",'
        f'listener="{listener}"' in text
    )


def test_h2_clients_of_an_h2c_app_take_the_engines_fast_path_when_it_runs(web: Web) -> None:
    """With the native engine, an h2 client of an h2c app is relayed by h2relay.c (its
    close line says ``relay: native``); on the Python backend (or with
    ``MESHPROXY_H2_FASTPATH=off``) by the Python HTTP layer."""
    res = web.curl("--http2", f"https://web.test.local:{web.fast}/which", listener="fast")
    assert res.returncode == 0, res.stderr
    backend = re.search(r'meshproxy_tls_backend_info\{backend="(\w+)"\}', _metrics(web))
    assert backend is not None
    closes: list[dict[str, object]] = []
    deadline = time.monotonic() + 10
    while not closes and time.monotonic() < deadline:
        closes = [e for e in web.proc.log_events()
                  if e.get("event") == "inbound.close" and e.get("listener") == "fast"
                  and e.get("protocol") == "h2"]  # fmt: skip
        time.sleep(0.05)
    assert closes, "no inbound.close line for an h2 connection of the fast listener"
    fast = backend.group(1) == "native" and os.environ.get("MESHPROXY_H2_FASTPATH") != "off"
    assert {e.get("relay") for e in closes} == ({"native"} if fast else {None})
