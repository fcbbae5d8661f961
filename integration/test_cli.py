"""The command contract, as users and scripts rely on it, against a real coordinator."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

from cryptography import x509

from integration.conftest import APPS, Mesh, package, port
from integration.harness import Cluster
from meshproxy.pki import cert_to_pem, create_root, generate_key


def basic_manifest(mesh: Mesh) -> dict[str, object]:
    return {"Packages": {"p": package(mesh.signer, 1)}, "Marbles": {"m": {"Package": "p"}}}


def test_manifest_verify_saves_the_root_and_refuses_another_manifest(mesh: Mesh) -> None:
    c = mesh.c
    path = mesh.set_manifest(basic_manifest(mesh))
    root = c.base / "verified-root.pem"
    ok = c.cli(
        "manifest",
        "verify",
        str(path),
        "--coordinator",
        c.client_addr,
        "--accept-simulation",
        "-o",
        str(root),
    )
    assert "SIMULATED" in ok.stdout
    assert "manifest verified" in ok.stdout
    cert = x509.load_pem_x509_certificate(root.read_bytes())
    assert "SIMULATION" in cert.subject.rfc4514_string()

    other = c.base / "other.json"
    other.write_text(path.read_text() + "\n")  # one byte more: another fingerprint
    bad = c.cli(
        "manifest",
        "verify",
        str(other),
        "--coordinator",
        c.client_addr,
        "--accept-simulation",
        check=False,
    )
    assert bad.returncode != 0
    assert "enforces another manifest" in bad.stderr
    assert "Traceback" not in bad.stderr

    no_sim = c.cli("manifest", "verify", str(path), "--coordinator", c.client_addr, check=False)
    assert no_sim.returncode != 0
    assert "--accept-simulation" in no_sim.stderr


def test_get_certificate_and_status_commands(mesh: Mesh) -> None:
    c = mesh.c
    path = mesh.set_manifest(basic_manifest(mesh))
    got = c.base / "got.json"
    c.cli("manifest", "get", "--coordinator", c.client_addr, "--accept-simulation", "-o", str(got))
    assert got.read_bytes() == path.read_bytes()
    chain = c.cli("certificate", "chain", "--coordinator", c.client_addr, "--accept-simulation")
    certs = x509.load_pem_x509_certificates(chain.stdout.encode())
    assert len(certs) == 2
    certs[0].verify_directly_issued_by(certs[1])
    root = c.cli("certificate", "root", "--coordinator", c.client_addr, "--accept-simulation")
    assert x509.load_pem_x509_certificate(root.stdout.encode()) == certs[1]
    status = c.cli("status", "--coordinator", c.client_addr, "--accept-simulation")
    assert status.stdout.startswith("3: ")
    assert "SIMULATION" in status.stdout
    # A pinned root that is not this cluster's is refused.
    other = create_root(now=datetime.now(UTC), dns_names=[], simulated=True, key=generate_key())
    foreign = c.base / "foreign.pem"
    foreign.write_bytes(cert_to_pem(other.cert))
    pinned = c.cli("status", "--coordinator", c.client_addr, "--root", str(foreign), check=False)
    assert pinned.returncode != 0
    assert "pinned root" in pinned.stderr


def test_malformed_manifest_is_refused_locally_with_its_path(cluster: Cluster) -> None:
    bad = cluster.base / "bad.json"
    bad.write_text(
        json.dumps({"Packages": {"p": {"Debug": True}}, "Marbles": {"m": {"Pakage": "p"}}})
    )
    res = cluster.cli(
        "manifest",
        "set",
        str(bad),
        "--coordinator",
        cluster.client_addr,
        "--accept-simulation",
        check=False,
    )
    assert res.returncode == 2
    assert "Marbles.m" in res.stderr
    assert "did you mean 'Package'" in res.stderr
    assert "Traceback" not in res.stderr
    status = cluster.cli("status", "--coordinator", cluster.client_addr, "--accept-simulation")
    assert status.stdout.startswith("2: ")  # still waiting for a manifest


def test_second_manifest_set_is_refused(mesh: Mesh) -> None:
    path = mesh.set_manifest(basic_manifest(mesh))
    res = mesh.c.cli(
        "manifest",
        "set",
        str(path),
        "--coordinator",
        mesh.c.client_addr,
        "--accept-simulation",
        check=False,
    )
    assert res.returncode != 0
    assert "already set" in res.stderr


def test_state_survives_a_coordinator_restart(mesh: Mesh) -> None:
    c = mesh.c
    path = mesh.set_manifest(basic_manifest(mesh))
    before = c.cli("certificate", "root", "--coordinator", c.client_addr, "--accept-simulation")
    c.procs[0].stop()
    c.start_coordinator(name="coordinator-restarted")
    after = c.cli("certificate", "root", "--coordinator", c.client_addr, "--accept-simulation")
    assert after.stdout == before.stdout
    c.cli("manifest", "verify", str(path), "--coordinator", c.client_addr, "--accept-simulation")


def test_malformed_marble_config_names_file_and_key(mesh: Mesh) -> None:
    mesh.set_manifest(basic_manifest(mesh))
    app = [sys.executable, str(APPS / "echo.py"), "MESHPROXY_INBOUND_E"]
    cfg = mesh.marble_config(
        "m",
        "m",
        app=app,
        inbound=[{"name": "e", "listen": f"127.0.0.1:{port()}", "clients": "marbles", "alow": []}],
    )
    proc = mesh.start("m", cfg, app, wait=False)
    assert proc.popen.wait(30) == 2
    out = proc.log.read_text()
    assert "marble.yaml: inbound[0]: unknown key 'alow' (did you mean 'allow'?)" in out
    assert "Traceback" not in out


def test_unreachable_coordinator_is_retried_then_reported(mesh: Mesh) -> None:
    mesh.set_manifest(basic_manifest(mesh))
    app = [sys.executable, "-c", "pass"]
    cfg = mesh.marble_config(
        "m", "m", app=app, coordinator=f"127.0.0.1:{port()}", activation_timeout="2s"
    )
    proc = mesh.start("m", cfg, app, wait=False)
    assert proc.popen.wait(30) != 0
    out = proc.log.read_text()
    assert "could not activate" in out
    assert "connection refused" in out
    assert out.count("retrying") >= 2 or out.count("retry") >= 2, out
    assert "Traceback" not in out


def test_app_that_exits_at_once_gives_the_proxy_its_exit_code(mesh: Mesh) -> None:
    mesh.set_manifest(basic_manifest(mesh))
    app = [sys.executable, "-c", "import sys; sys.exit(7)"]
    cfg = mesh.marble_config("m", "m", app=app)
    proc = mesh.start("m", cfg, app, wait=False)
    assert proc.popen.wait(30) == 7, proc.log.read_text()
