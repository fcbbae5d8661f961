"""Running marbles renew their certificates (issue 6), with real ``meshproxy run``
processes and a real coordinator:

    test --unix--> client marble (Python backend) --mTLS--> server marble (native) --> echo
                                                             old server marble (SVN 1)

An update raises the package's SecurityVersion to 2. The compliant marbles (SVN 2) learn
of it from the coordinator's status (a new intermediate), renew, and go on: an open
connection keeps working, new connections get the new certificate, the apps are not
restarted; at 70 % of the 1-minute lifetime they renew again. The old marble (SVN 1) is
refused renewal, says so loudly, and stops serving when its certificate expires.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from integration.conftest import APPS, Mesh, package, port
from integration.harness import Proc, wait_for
from integration.test_lifecycle_env import make_user, write_manifest

ECHO = [sys.executable, str(APPS / "echo.py"), "MESHPROXY_INBOUND_E"]
IDLE = [sys.executable, "-c", "import time; time.sleep(3600)"]


def events(proc: Proc, name: str) -> list[dict[str, Any]]:
    return [e for e in proc.log_events() if e.get("event") == name]


def presented_leaf(port: int) -> x509.Certificate:
    """The certificate a listener presents (TLS 1.3 sends it before it checks ours)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as tcp,
        ctx.wrap_socket(tcp) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def chain(mesh: Mesh) -> list[x509.Certificate]:
    out = mesh.c.cli(
        "certificate", "chain", "--coordinator", mesh.c.client_addr, "--accept-simulation"
    )
    return x509.load_pem_x509_certificates(out.stdout.encode())


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_an_update_renews_compliant_marbles_and_cuts_off_an_old_one(
    mesh: Mesh, tmp_path: Path
) -> None:
    alice = make_user(tmp_path / "users", "alice")
    manifest = {
        "Packages": {"app": package(mesh.signer, 1, svn=1)},
        "Marbles": {"server": {"Package": "app"}, "client": {"Package": "app"}},
        "Mesh": {
            "TrustDomain": "renew.test",
            "CertificateLifetime": "1m",
            "Allow": {"server": ["client"]},
        },
        "Users": {"alice": {"Certificate": alice.pem, "Roles": ["svn"]}},
        "Roles": {
            "svn": {
                "ResourceType": "Packages",
                "ResourceNames": ["app"],
                "Actions": ["UpdateSecurityVersion"],
            }
        },
    }
    mesh.set_manifest(manifest)
    old_port, srv_port = port(), port()

    poll = {"coordinator": {"address": mesh.c.mesh_addr, "update_poll": "2s"}}

    def server(name: str, listen: int, svn: int) -> Proc:
        inbound = [{"name": "e", "listen": f"127.0.0.1:{listen}"}]
        cfg = mesh.marble_config(name, "server", app=ECHO, inbound=inbound, svn=svn,
                                 extra=poll)  # fmt: skip
        return mesh.start(name, cfg, ECHO)

    mesh.c.env["MESHPROXY_NATIVE"] = "off"
    try:
        old = server("old", old_port, 1)
        outbound = [{"name": "up", "upstream": f"127.0.0.1:{srv_port}", "peer": "server"}]
        client_cfg = mesh.marble_config("client", "client", app=IDLE, outbound=outbound, svn=2,
                                        extra=poll)  # fmt: skip
        client = mesh.start("client", client_cfg, IDLE)
    finally:
        del mesh.c.env["MESHPROXY_NATIVE"]
    srv = server("server", srv_port, 2)
    first_chain = chain(mesh)
    assert presented_leaf(srv_port).issuer == first_chain[0].subject
    presented_leaf(srv_port).verify_directly_issued_by(first_chain[0])

    # An open connection through both proxies, before the update.
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.settimeout(10)
    held.connect(client.info["outbound"]["up"])
    held.sendall(b"before\n")
    assert held.recv(100) == b"before\n"

    bump = write_manifest(tmp_path / "bump.json", {"Packages": {"app": {"SecurityVersion": 2}}})
    mesh.c.cli(
        "manifest", "update", "apply", str(bump), "--coordinator", mesh.c.client_addr,
        "--accept-simulation", *alice.args(),
    )  # fmt: skip
    started = time.monotonic()
    new_chain = chain(mesh)
    assert new_chain[0] != first_chain[0]
    assert new_chain[1] == first_chain[1]  # the root stays

    for proc in (srv, client):
        wait_for(lambda p=proc: events(p, "renewal.done"), 30, f"{proc.name} renews", proc.popen)
    assert time.monotonic() - started < 15  # promptly: the 2 s poll, not the 70 % mark (42 s)
    assert [e["event"] for e in events(srv, "renewal.update")] == ["renewal.update"]

    # The open connection was not touched; a new one goes through under the new intermediate.
    held.sendall(b"after\n")
    assert held.recv(100) == b"after\n"
    held.close()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fresh:
        fresh.settimeout(10)
        fresh.connect(client.info["outbound"]["up"])
        fresh.sendall(b"fresh\n")
        assert fresh.recv(100) == b"fresh\n"
    leaf = presented_leaf(srv_port)
    leaf.verify_directly_issued_by(new_chain[0])
    # The apps kept running: one start each, the same pid, alive.
    for proc in (srv, client):
        assert len(events(proc, "app.start")) == 1
        os.kill(proc.info["pid"], 0)

    # The old marble is refused, loudly, and keeps serving only until its leaf expires.
    refused = wait_for(lambda: events(old, "renewal.refused"), 30, "old refused", old.popen)
    assert refused[0]["level"] == "error"
    assert "SecurityVersion 1 is below" in refused[0]["reason"]
    wait_for(lambda: refuses(old_port), 90, "the old marble's listener to refuse", old.popen)
    assert events(old, "renewal.expired")
    assert old.popen.poll() is None  # still running, still retrying
    assert not refuses(srv_port)

    # Meanwhile the 1-minute leaves came to 70 % of their lifetime: renewed again, no update.
    wait_for(lambda: len(events(srv, "renewal.done")) >= 2, 30, "a second renewal", srv.popen)
    first, second = events(srv, "renewal.done")[:2]
    assert first["new_intermediate"] is True
    assert second["new_intermediate"] is False
    assert len(events(srv, "renewal.update")) == 1
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as again:
        again.settimeout(10)
        again.connect(client.info["outbound"]["up"])
        again.sendall(b"again\n")
        assert again.recv(100) == b"again\n"
