"""TLS contexts built from memory: what they negotiate, whom they trust, where the key goes."""

from __future__ import annotations

import importlib.util
import os
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from meshproxy import pki
from meshproxy.errors import NativeUnavailable, PKIError
from meshproxy.tls import (
    TLSIdentity,
    client_context,
    describe_backend,
    select_backend,
    server_context,
)

ROOT = Path(__file__).resolve().parent.parent


def _identity(issuer: pki.Authority, marble_type: str) -> TLSIdentity:
    now = datetime.now(UTC)
    key = pki.generate_key()
    cert = pki.issue_leaf(
        issuer,
        pki.make_csr(key, marble_type, []),
        trust_domain="mesh.local",
        marble_type=marble_type,
        instance=uuid.uuid4(),
        dns_names=["localhost"],
        lifetime=timedelta(hours=1),
        now=now,
        simulated=True,
    )
    return TLSIdentity(
        pki.certs_to_pem([cert, issuer.cert]), pki.key_to_pem(key), pki.cert_to_pem(issuer.cert)
    )


@pytest.fixture(scope="module")
def authority() -> tuple[pki.Authority, pki.Authority]:
    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    return root, pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())


def handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, sni: str | None = None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A real TLS handshake between two contexts over memory BIOs."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname=sni)
    done = {"s": False, "c": False}
    for _ in range(10):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3 tickets would travel now, with the first server data
            s.write(b"ping")
            c_in.write(s_out.read())
            assert c.read(4) == b"ping"
            return s, c
    raise AssertionError("handshake did not finish")


def test_mutual_tls_from_memory_negotiates_tls13_without_tickets(
    authority: tuple[pki.Authority, pki.Authority],
) -> None:
    _, inter = authority
    backend, frontend = _identity(inter, "backend"), _identity(inter, "frontend")
    s, c = handshake(server_context(backend, client_auth=True), client_context(frontend))
    assert s.version() == c.version() == "TLSv1.3"
    peer = s.getpeercert(binary_form=True)
    assert peer is not None
    assert x509.load_der_x509_certificate(peer) == pki.cert_from_pem(frontend.chain_pem)
    assert c.session is None or not c.session.has_ticket
    assert c.selected_alpn_protocol() is None


def test_mtls_server_refuses_a_client_without_certificate(
    authority: tuple[pki.Authority, pki.Authority],
) -> None:
    _, inter = authority
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cadata=pki.cert_to_pem(inter.cert).decode())
    anonymous.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    anonymous.check_hostname = False
    server = server_context(_identity(inter, "backend"), client_auth=True)
    with pytest.raises(ssl.SSLError, match="PEER_DID_NOT_RETURN_A_CERTIFICATE"):
        handshake(server, anonymous)


def test_public_server_needs_no_client_certificate_and_chains_to_the_root(
    authority: tuple[pki.Authority, pki.Authority],
) -> None:
    root, inter = authority
    outsider = ssl.create_default_context(cadata=pki.cert_to_pem(root.cert).decode())
    s, c = handshake(
        server_context(_identity(inter, "frontend"), client_auth=False), outsider, "localhost"
    )
    assert s.getpeercert(binary_form=True) is None
    assert c.version() == "TLSv1.3"


def test_tls12_clients_are_refused(authority: tuple[pki.Authority, pki.Authority]) -> None:
    root, inter = authority
    old = ssl.create_default_context(cadata=pki.cert_to_pem(root.cert).decode())
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError, match=r"(?i)protocol version|unsupported protocol"):
        handshake(server_context(_identity(inter, "frontend"), client_auth=False), old)


def test_istio_alpn_can_never_be_offered(authority: tuple[pki.Authority, pki.Authority]) -> None:
    _, inter = authority
    with pytest.raises(ValueError, match="istio"):
        client_context(_identity(inter, "frontend"), alpn=["h2", "istio-peer-exchange"])


def test_a_key_that_does_not_match_the_certificate_is_a_pki_error(
    authority: tuple[pki.Authority, pki.Authority],
) -> None:
    _, inter = authority
    good = _identity(inter, "backend")
    other_key = pki.key_to_pem(pki.generate_key())
    mismatched = TLSIdentity(good.chain_pem, other_key, good.trust_pem)
    with pytest.raises(PKIError, match="do not load") as err:
        server_context(mismatched, client_auth=True)
    assert b"PRIVATE KEY" not in str(err.value).encode()
    assert "PRIVATE KEY" not in repr(mismatched)


def _files_holding(needle: bytes, roots: list[Path], since: float) -> list[Path]:
    hits = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath, name)
                try:
                    st = path.lstat()
                    if not path.is_file() or st.st_mtime < since or st.st_size > 1 << 20:
                        continue
                    if needle in path.read_bytes():
                        hits.append(path)
                except OSError:
                    continue
    return hits


def test_no_key_file_is_written_anywhere(
    authority: tuple[pki.Authority, pki.Authority], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, inter = authority
    monkeypatch.chdir(tmp_path)
    since = time.time() - 1
    identity = _identity(inter, "backend")
    fds_before = set(os.listdir("/proc/self/fd"))
    for _ in range(3):
        server_context(identity, client_auth=True)
        server_context(identity, client_auth=False)
        client_context(identity)
    body = identity.key_pem.reveal().splitlines()[1]  # a line of the base64 key
    assert _files_holding(body, [tmp_path, Path("/tmp"), Path("/dev/shm")], since) == []
    leaked = [
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in set(os.listdir("/proc/self/fd")) - fds_before
        if os.path.exists(f"/proc/self/fd/{fd}")
    ]
    assert not [link for link in leaked if "memfd" in link]


# -- the native module ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> object:
    """native_tls/module.c compiled now, against the system libssl, and imported."""
    out = tmp_path_factory.mktemp("native")
    build = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(out / "lib"),
            "--build-temp",
            str(out / "tmp"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (so,) = (out / "lib" / "meshproxy").glob("_native_tls*.so")
    spec = importlib.util.spec_from_file_location("meshproxy._native_tls", so)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_native_module_reports_the_openssl_it_links(native: object) -> None:
    version = native.openssl_version()  # type: ignore[attr-defined]
    assert version.startswith("OpenSSL 3.")
    assert native.ENGINE_API >= 1  # type: ignore[attr-defined]


@pytest.fixture
def reselect() -> Iterator[None]:
    """Tests here change the process's backend selection: choose again from the env after."""
    yield
    select_backend()


@pytest.mark.usefixtures("reselect")
def test_backend_description_names_the_native_module(
    native: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "meshproxy._native_tls", native)
    assert select_backend("auto") == "native"
    assert describe_backend().startswith("native (C engine on OpenSSL 3.")
    assert select_backend("require") == "native"
    assert select_backend("off") == "python"
    assert describe_backend().startswith("python (stdlib ssl on uvloop); native module loaded")


@pytest.mark.usefixtures("reselect")
def test_backend_description_says_when_the_native_module_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "meshproxy._native_tls", None)  # import fails
    assert select_backend("auto") == "python"
    assert describe_backend().startswith("python (stdlib ssl on uvloop); native module missing")
    assert select_backend("off") == "python"
    with pytest.raises(NativeUnavailable, match="not built"):
        select_backend("require")
