"""``proxy_protocol: v2`` on tcp listeners, read by nginx and by a Python app.

    test --unix--> client marble's tcp outbound --mTLS--> server marble's inbound
                   (protocol: tcp, proxy_protocol: v2) --unix: PROXY v2 header + bytes--> app

nginx (its own PROXY parser, ``listen ... proxy_protocol``) proves the header is well
formed; the Python app (``pp_probe.py``) reads the identity TLV 0xE0.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from integration.conftest import APPS, Mesh, Signer, package, port
from integration.harness import Cluster, Proc, wait_for

IDLE = [sys.executable, "-c", "import signal; signal.pause()"]
NGINX_CONF = """
user root;
worker_processes 1;
pid {dir}/nginx.pid;
events {{}}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen unix:{sock} proxy_protocol;
        location / {{ return 200 "pp $proxy_protocol_addr $proxy_protocol_port\\n"; }}
    }}
}}
"""


@dataclass
class PP:
    server: Proc
    client: Proc

    def exchange(self, outbound: str, data: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(20)
            s.connect(self.client.info["outbound"][outbound])
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out


@pytest.fixture(scope="module")
def pp_mesh(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Iterator[PP]:
    if shutil.which("nginx") is None:  # scripts/setup.sh installs it
        pytest.fail("nginx is not installed (Debian: apt-get install nginx)")
    with Cluster(tmp_path_factory.mktemp("pp")) as cluster:
        cluster.start_coordinator()
        mesh = Mesh(cluster, signer)
        mesh.set_manifest(
            {
                "Packages": {"p": package(signer, 1)},
                "Marbles": {"server": {"Package": "p"}, "client": {"Package": "p"}},
                "Mesh": {"TrustDomain": "pp.test", "Allow": {"server": ["client"]}},
            }
        )
        pp_port, ngx_port = port(), port()
        nginx_dir = mesh.dir / "server" / "nginx"
        conf = nginx_dir / "nginx.conf"
        app = [
            "sh",
            "-c",
            f"{sys.executable} {APPS / 'pp_probe.py'} MESHPROXY_INBOUND_PP & "
            f"exec nginx -e stderr -p {nginx_dir} -c {conf} -g 'daemon off;'",
        ]
        server_cfg = mesh.marble_config(
            "server",
            "server",
            app=app,
            inbound=[
                {"name": "pp", "listen": f"127.0.0.1:{pp_port}", "proxy_protocol": "v2"},
                {"name": "ngx", "listen": f"127.0.0.1:{ngx_port}", "proxy_protocol": "v2"},
            ],
        )
        nginx_dir.mkdir(parents=True)
        sock = mesh.dir / "server" / "run" / "inbound-ngx.sock"
        conf.write_text(NGINX_CONF.format(dir=nginx_dir, sock=sock))
        client_cfg = mesh.marble_config(
            "client",
            "client",
            app=IDLE,
            outbound=[
                {"name": "pp", "upstream": f"127.0.0.1:{pp_port}", "peer": "server"},
                {"name": "ngx", "upstream": f"127.0.0.1:{ngx_port}", "peer": "server"},
            ],
        )
        server = mesh.start("server", server_cfg, app)
        wait_for(sock.exists, 20, "nginx listening", server.popen, server.log)
        client = mesh.start("client", client_cfg, IDLE)
        yield PP(server, client)


def test_the_app_reads_the_callers_spiffe_id_from_tlv_0xe0(pp_mesh: PP) -> None:
    out = pp_mesh.exchange("pp", b"hello after the header")
    line, _, rest = out.partition(b"\n")
    doc = json.loads(line)
    assert doc["spiffe_id"] == "spiffe://pp.test/marble/client"
    assert doc["uuid"]  # the caller's instance UUID, TLV 0xE1
    assert doc["ssl_version"] == "TLSv1.3"
    assert doc["verify"] == 0
    assert doc["family"] == 1  # INET: the TCP addresses the listener saw
    assert doc["source"][0] == "127.0.0.1"
    assert rest == b"hello after the header"  # the connection's own bytes follow untouched


def test_nginx_parses_the_header_with_its_own_proxy_protocol_reader(pp_mesh: PP) -> None:
    out = pp_mesh.exchange("ngx", b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), out
    word, addr, src_port = body.decode().split()
    assert (word, addr) == ("pp", "127.0.0.1")
    assert 0 < int(src_port) < 65536
