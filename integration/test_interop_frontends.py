"""What sits in front of marbles in real deployments, and what meshes see of our traffic.

* haproxy routes our TLS by SNI (``req_ssl_sni``) to two different marbles, unterminated;
* nginx terminates a client's HTTP and routes by ``:authority``/Host to two marbles over
  TLS that it verifies against the cluster root (``proxy_ssl_verify``);
* our TLS travels inside an outer TLS tunnel (stunnel client -> stunnel server), the way a
  sidecar's mTLS wraps it, and reaches the listener from 127.0.0.1;
* a mesh sniffing our outbound connections sees a ClientHello within milliseconds of the
  TCP connect, SNI = the configured service name, and ALPN ``h2`` or ``http/1.1`` for
  HTTP listeners and none for TCP: never ``istio*`` (L2, L3, I1, I2, X1, X3).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration.conftest import APPS, Mesh, Signer, package, port, root_certificate, wait_tcp
from integration.harness import Cluster, Proc

HELLO = [sys.executable, str(APPS / "http_hello.py"), "MESHPROXY_INBOUND_WEB", "WHO"]
IDLE = [sys.executable, "-c", "import signal; signal.pause()"]


@dataclass
class Sniffer:
    """A TCP server that records each connection's first bytes and how long they took."""

    sock: socket.socket
    seen: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                accepted = time.monotonic()
                conn.settimeout(5)
                try:
                    data = conn.recv(16384)
                except OSError:
                    data = b""
                self.seen.append(((time.monotonic() - accepted) * 1000, data))


@dataclass
class Front:
    mesh: Mesh
    alpha: int
    beta: int
    root: Path
    probe: Proc
    sniffer: Sniffer
    workdir: Path

    def curl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--cacert", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def spawn(self, name: str, argv: list[str]) -> Proc:
        return self.mesh.c.spawn(name, argv)


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Iterator[Front]:
    base = tmp_path_factory.mktemp("front")
    sniff = socket.socket()
    sniff.bind(("127.0.0.1", 0))
    sniff.listen(16)
    sniffer = Sniffer(sniff)
    threading.Thread(target=sniffer.serve, daemon=True).start()
    with Cluster(base) as cluster:
        cluster.start_coordinator()
        mesh = Mesh(cluster, signer)
        mesh.set_manifest(
            {
                "Packages": {"p": package(signer, 1)},
                "Marbles": {
                    "alpha": {"Package": "p", "Parameters": {"Env": {"WHO": "from-alpha"}}},
                    "beta": {"Package": "p", "Parameters": {"Env": {"WHO": "from-beta"}}},
                    "probe": {"Package": "p"},
                },
                "Mesh": {"TrustDomain": "front.test"},
            }
        )
        ports = {}
        for name in ("alpha", "beta"):
            ports[name] = port()
            cfg = mesh.marble_config(
                name,
                name,
                app=HELLO,
                inbound=[
                    {
                        "name": "web",
                        "listen": f"127.0.0.1:{ports[name]}",
                        "protocol": "http",
                        "clients": "public",
                    }
                ],
            )
            mesh.start(name, cfg, HELLO)
        probe_cfg = mesh.marble_config(
            "probe",
            "probe",
            app=IDLE,
            outbound=[
                {
                    "name": "h",
                    "upstream": f"127.0.0.1:{sniffer.port}",
                    "peer": "alpha",
                    "sni": "alpha.test.local",
                    "protocol": "http",
                },
                {
                    "name": "t",
                    "upstream": f"127.0.0.1:{sniffer.port}",
                    "peer": "alpha",
                    "sni": "alpha.test.local",
                },
            ],
        )
        probe = mesh.start("probe", probe_cfg, IDLE)
        root = root_certificate(mesh, base / "root.pem")
        yield Front(mesh, ports["alpha"], ports["beta"], root, probe, sniffer, base)
    sniff.close()


def test_haproxy_routes_our_tls_by_sni_to_two_marbles(front: Front) -> None:
    hp = port()
    cfg = front.workdir / "haproxy.cfg"
    cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend sni
    bind 127.0.0.1:{hp}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
    use_backend alpha if {{ req_ssl_sni -i alpha.test.local }}
    use_backend beta if {{ req_ssl_sni -i beta.test.local }}
backend alpha
    server a 127.0.0.1:{front.alpha}
backend beta
    server b 127.0.0.1:{front.beta}
""")
    proc = front.spawn("haproxy", ["haproxy", "-db", "-f", str(cfg)])
    wait_tcp(hp, "haproxy", proc.popen)
    for name in ("alpha", "beta", "alpha"):
        for flag in ("--http2", "--http1.1"):
            res = front.curl(
                flag,
                "--resolve",
                f"{name}.test.local:{hp}:127.0.0.1",
                f"https://{name}.test.local:{hp}/via-haproxy",
            )
            assert res.returncode == 0, res.stderr
            assert res.stdout == f"hello /via-haproxy from-{name}\n"
    proc.stop()


def test_nginx_routes_by_authority_to_two_marbles_and_verifies_them(front: Front) -> None:
    np_ = port()
    d = front.workdir / "nginx"
    d.mkdir(exist_ok=True)
    servers = "".join(
        f"""
    server {{
        listen 127.0.0.1:{np_};
        server_name {name}.test.local;
        location / {{
            proxy_pass https://127.0.0.1:{p};
            proxy_http_version 1.1;
            proxy_ssl_server_name on;
            proxy_ssl_name {name}.test.local;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 3;
            proxy_ssl_trusted_certificate {front.root};
            proxy_ssl_protocols TLSv1.3;
        }}
    }}"""
        for name, p in (("alpha", front.alpha), ("beta", front.beta))
    )
    temp = " ".join(
        f"{k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (d / "nginx.conf").write_text(
        f"user root; worker_processes 1; pid {d}/nginx.pid; events {{}}\n"
        f"http {{ access_log off; {temp} {servers}\n}}\n"
    )
    proc = front.spawn(
        "nginx",
        ["nginx", "-e", "stderr", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
    )
    wait_tcp(np_, "nginx", proc.popen)
    for name in ("beta", "alpha"):
        res = subprocess.run(
            [
                "curl",
                "-sS",
                "-H",
                f"Host: {name}.test.local",
                f"http://127.0.0.1:{np_}/by-authority",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.stdout == f"hello /by-authority from-{name}\n", res
    proc.stop()


def test_our_tls_inside_an_outer_tls_tunnel_delivered_from_loopback(front: Front) -> None:
    d = front.workdir / "stunnel"
    d.mkdir(exist_ok=True)
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(d / "outer.key"),
            "-out",
            str(d / "outer.pem"),
            "-subj",
            "/CN=outer-mesh",
            "-days",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    outer, entry = port(), port()
    (d / "server.conf").write_text(
        f"foreground = yes\npid =\n[outer]\naccept = 127.0.0.1:{outer}\n"
        f"connect = 127.0.0.1:{front.alpha}\ncert = {d / 'outer.pem'}\nkey = {d / 'outer.key'}\n"
    )
    (d / "client.conf").write_text(
        f"foreground = yes\npid =\n[wrap]\nclient = yes\naccept = 127.0.0.1:{entry}\n"
        f"connect = 127.0.0.1:{outer}\n"
    )
    server = front.spawn("stunnel-server", ["stunnel", str(d / "server.conf")])
    client = front.spawn("stunnel-client", ["stunnel", str(d / "client.conf")])
    wait_tcp(outer, "stunnel server", server.popen)
    wait_tcp(entry, "stunnel client", client.popen)
    res = front.curl(
        "--http2",
        "--resolve",
        f"alpha.test.local:{entry}:127.0.0.1",
        f"https://alpha.test.local:{entry}/double-tls",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello /double-tls from-alpha\n"
    client.stop()
    server.stop()


def _client_hello(data: bytes) -> tuple[str | None, list[str]]:
    """SNI and ALPN names of a TLS ClientHello (RFC 8446 4.1.2, RFC 6066 3, RFC 7301)."""
    assert data[:1] == b"\x16", "not a handshake record"
    assert data[5:6] == b"\x01", "not a ClientHello"
    i = 5 + 4 + 2 + 32
    i += 1 + data[i]
    i += 2 + int.from_bytes(data[i : i + 2], "big")
    i += 1 + data[i]
    end = i + 2 + int.from_bytes(data[i : i + 2], "big")
    i += 2
    sni, alpn = None, []
    while i < end:
        kind = int.from_bytes(data[i : i + 2], "big")
        size = int.from_bytes(data[i + 2 : i + 4], "big")
        ext = data[i + 4 : i + 4 + size]
        if kind == 0:
            sni = ext[5 : 5 + int.from_bytes(ext[3:5], "big")].decode()
        elif kind == 16:
            j = 2
            while j < len(ext):
                alpn.append(ext[j + 1 : j + 1 + ext[j]].decode())
                j += 1 + ext[j]
        i += 4 + size
    return sni, alpn


def _poke_outbound(front: Front, name: str, request: list[str] | None) -> None:
    socket_path = front.probe.info["outbound"][name]
    if request is None:  # tcp: connecting is enough, the dial happens at once
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(socket_path)
            s.recv(1)
        return
    subprocess.run(
        ["curl", "-sS", "-m", "10", "--unix-socket", socket_path, *request],
        capture_output=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("outbound", "curl_args", "alpn"),
    [
        ("h", ["--http2-prior-knowledge", "http://alpha/"], ["h2"]),
        ("h", ["--http1.1", "http://alpha/"], ["http/1.1"]),
        ("t", None, []),
    ],
)
def test_outbound_client_hello_is_prompt_names_the_service_and_never_offers_istio(
    front: Front, outbound: str, curl_args: list[str] | None, alpn: list[str]
) -> None:
    before = len(front.sniffer.seen)
    _poke_outbound(front, outbound, curl_args)
    deadline = time.monotonic() + 10
    while len(front.sniffer.seen) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    delay_ms, data = front.sniffer.seen[before]
    sni, offered = _client_hello(data)
    assert sni == "alpha.test.local"
    assert offered == alpn
    assert not any(p.lower().startswith("istio") for p in offered)
    assert delay_ms < 200, f"ClientHello came {delay_ms:.0f} ms after the connect"
