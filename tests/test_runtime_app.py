"""``meshproxy run`` after activation: the app, its environment, signals, orphans, exit codes.

The coordinator is replaced by an activation object built here (same fields as
``coordinator.client.Activation``), over a PKI made per test; everything after it is the
real runtime in a real process: Files, listeners, the app, readiness, supervision.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from meshproxy import pki
from meshproxy.errors import AttestationError, ConnectError, CoordinatorError, PKIError
from meshproxy.runtime import activate_with_retry, instance_uuid, quote_provider, write_files

ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "mesh.local"

# The driver stands in for the CLI from activation on: it loads the PKI the test made,
# builds an Activation-shaped object and hands it to the real runtime.
DRIVER = textwrap.dedent(
    """
    import json, sys
    from dataclasses import dataclass, field
    from pathlib import Path
    from meshproxy import pki
    from meshproxy._log import setup
    from meshproxy._redact import Secret
    from meshproxy.config import load_marble_config
    from meshproxy.errors import MeshError
    from meshproxy.runtime import execute

    from meshproxy.coordinator.client import MeshPolicy as Mesh

    @dataclass(frozen=True)
    class Activation:
        marble_type: str; uuid: str; leaf: object; intermediate: object; root: object
        files: dict; env: dict; argv: tuple; mesh: Mesh; simulated: bool

    d = Path(sys.argv[1])
    spec = json.loads((d / "activation.json").read_text())
    cfg = load_marble_config(d / "marble.yaml")
    setup(cfg.log.level, cfg.log.format)
    act = Activation(
        "backend", spec["uuid"], pki.cert_from_pem((d / "leaf.pem").read_bytes()),
        pki.cert_from_pem((d / "inter.pem").read_bytes()),
        pki.cert_from_pem((d / "root.pem").read_bytes()),
        {k: v.encode() for k, v in spec["files"].items()},
        {k: v.encode() for k, v in spec["env"].items()},
        tuple(spec["argv"]), Mesh(DOMAIN, spec["allow"]), True,
    )
    key = pki.key_from_pem(Secret((d / "leaf.key").read_bytes()))
    try:
        sys.exit(execute(cfg, act, key, sys.argv[2:], shutdown_grace=spec["grace"]))
    except MeshError as exc:
        print(f"meshproxy: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    """
).replace("DOMAIN", repr(DOMAIN))


class Marble:
    """A runtime process under test, with the PKI and directory it runs on."""

    def __init__(self, base: Path, ca: pki.Authority, inter: pki.Authority) -> None:
        self.base = base
        self.ca = ca
        self.inter = inter
        self.workdir = base / "work"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = b""

    def start(
        self,
        app: list[str],
        *,
        manifest_argv: list[str] | None = None,
        allow: list[str] | None = None,
        files: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        grace: float = 10.0,
        inbound_allow: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        now = datetime.now(UTC)
        key = pki.generate_key()
        leaf = pki.issue_leaf(
            self.inter,
            pki.make_csr(key, "backend", []),
            trust_domain=DOMAIN,
            marble_type="backend",
            instance=uuid.uuid4(),
            dns_names=["localhost"],
            lifetime=timedelta(hours=1),
            now=now,
            simulated=True,
        )
        (self.base / "leaf.pem").write_bytes(pki.cert_to_pem(leaf))
        (self.base / "leaf.key").write_bytes(pki.key_to_pem(key).reveal())
        (self.base / "inter.pem").write_bytes(pki.cert_to_pem(self.inter.cert))
        (self.base / "root.pem").write_bytes(pki.cert_to_pem(self.ca.cert))
        (self.base / "driver.py").write_text(DRIVER)
        inbound: dict[str, Any] = {"name": "api", "listen": "127.0.0.1:0"}
        if inbound_allow is not None:
            inbound["allow"] = inbound_allow
        config = {
            "coordinator": {"address": "127.0.0.1:1"},
            "marble": {"type": "backend"},
            "attestation": {"provider": "simulation", "enclave": "unused.json"},
            "workdir": "work",
            "inbound": [inbound],
            "outbound": [{"name": "store", "upstream": "127.0.0.1:9", "peer": "store"}],
        }
        (self.base / "marble.yaml").write_text(yaml.safe_dump(config))
        spec = {
            "uuid": str(uuid.uuid4()),
            "files": files or {},
            "env": env or {},
            "argv": manifest_argv or [],
            "allow": {"backend": allow if allow is not None else ["frontend"]},
            "grace": grace,
        }
        (self.base / "activation.json").write_text(json.dumps(spec))
        self.proc = subprocess.Popen(
            [sys.executable, str(self.base / "driver.py"), str(self.base), *app],
            cwd=self.base,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
        )
        return self.proc

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        _, self.stderr = self.proc.communicate(timeout=timeout)
        return self.proc.returncode

    def ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Poll ready.json (written atomically once the app runs)."""
        path = self.workdir / "ready.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.proc.stderr!r}")
            if time.monotonic() > deadline:
                raise AssertionError("ready.json never appeared")
            time.sleep(0.02)
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc

    def armed(self, timeout: float = 15.0) -> None:
        """Wait until the app says its signal handlers are installed."""
        deadline = time.monotonic() + timeout
        while not (self.base / "armed").exists():
            if time.monotonic() > deadline:
                raise AssertionError("the app never installed its signal handlers")
            time.sleep(0.02)

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in self.stderr.decode().splitlines() if x.startswith("{")]
        return [line for line in lines if line.get("event") == name]


@pytest.fixture(scope="module")
def authorities() -> tuple[pki.Authority, pki.Authority]:
    now = datetime.now(UTC)
    root = pki.create_root(now=now, dns_names=[], simulated=True, key=pki.generate_key())
    return root, pki.create_intermediate(root, now=now, simulated=True, key=pki.generate_key())


@pytest.fixture
def marble(authorities: tuple[pki.Authority, pki.Authority]) -> Iterator[Marble]:
    base = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))  # short Unix socket paths
    m = Marble(base, *authorities)
    yield m
    if m.proc is not None and m.proc.poll() is None:
        m.proc.kill()
        m.proc.wait()
    subprocess.run(["rm", "-rf", str(base)], check=False)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# -- exit status ---------------------------------------------------------------------------
def test_the_app_exit_code_is_the_proxy_exit_code(marble: Marble) -> None:
    marble.start(["sh", "-c", "exit 7"])
    assert marble.wait() == 7
    assert marble.events("app.exit")[0]["code"] == 7
    assert not (marble.workdir / "ready.json").exists()  # no stale readiness after exit


def test_an_app_killed_by_a_signal_exits_128_plus_n(marble: Marble) -> None:
    marble.start(["sh", "-c", "kill -KILL $$"])
    assert marble.wait() == 128 + signal.SIGKILL


def test_the_manifest_argv_runs_when_the_command_line_has_none(marble: Marble) -> None:
    marble.start([], manifest_argv=["sh", "-c", "exit 5"])
    assert marble.wait() == 5


def test_without_any_app_the_proxy_refuses_to_start(marble: Marble) -> None:
    marble.start([])
    assert marble.wait() == 2
    assert b"no app to run" in marble.stderr


def test_an_app_that_cannot_be_found_is_an_error(marble: Marble) -> None:
    marble.start(["/nonexistent/app"])
    assert marble.wait() == 1
    assert b"cannot start the app '/nonexistent/app'" in marble.stderr


def test_a_listener_allow_wider_than_the_manifest_is_refused(marble: Marble) -> None:
    marble.start(["true"], allow=["frontend"], inbound_allow=["frontend", "intruder"])
    assert marble.wait() == 1
    err = marble.stderr.decode()
    assert "inbound[0] (api): allow lists intruder" in err
    assert "manifest allows: frontend" in err


# -- signals and children ------------------------------------------------------------------
def test_sigterm_is_forwarded_and_the_app_decides_the_exit_code(marble: Marble) -> None:
    app = py(
        """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))
        open("armed", "w").close()
        while True:
            time.sleep(0.05)
        """
    )
    proc = marble.start(app)
    ready = marble.ready()
    assert ready["pid"] > 0
    marble.armed()
    proc.send_signal(signal.SIGTERM)
    assert marble.wait() == 42
    assert marble.events("signal")[0]["signal"] == "SIGTERM"


def test_an_app_ignoring_sigterm_is_killed_after_the_grace_period(marble: Marble) -> None:
    app = py(
        """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open("armed", "w").close()
        while True:
            time.sleep(0.05)
        """
    )
    proc = marble.start(app, grace=0.5)
    marble.ready()
    marble.armed()
    proc.send_signal(signal.SIGTERM)
    assert marble.wait() == 128 + signal.SIGKILL
    assert marble.events("app.kill")


def test_sighup_is_forwarded_without_stopping(marble: Marble) -> None:
    app = py(
        """
        import signal, sys, time
        signal.signal(signal.SIGHUP, lambda *_: sys.exit(11))
        open("armed", "w").close()
        while True:
            time.sleep(0.05)
        """
    )
    proc = marble.start(app)
    marble.ready()
    marble.armed()
    proc.send_signal(signal.SIGHUP)
    assert marble.wait() == 11


def test_orphans_of_the_app_are_reaped(marble: Marble) -> None:
    """The app double-forks; the grandchild must not stay a zombie once it exits."""
    app = py(
        """
        import os, sys, time
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            grandchild = os.fork()
            if grandchild == 0:
                time.sleep(0.2)
                os._exit(0)
            os.write(w, str(grandchild).encode())
            os._exit(0)  # the grandchild is an orphan now
        os.waitpid(child, 0)
        pid = int(os.read(r, 32))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                print(pid, flush=True)
                sys.exit(0)  # reaped by our supervisor
            time.sleep(0.05)
        sys.exit(3)  # still a zombie (state Z) or still running
        """
    )
    marble.start(app)
    assert marble.wait() == 0
    assert marble.events("app.reaped")


# -- what the app gets ---------------------------------------------------------------------
def test_the_app_gets_files_env_sockets_and_a_tls_path(marble: Marble) -> None:
    app = py(
        """
        import json, os, socket, stat
        root = os.environ["MESHPROXY_FILES_ROOT"]
        conf = os.path.join(root, "etc", "app.conf")
        info = {k: v for k, v in os.environ.items()
                if k.startswith(("MESHPROXY_", "MARBLE_PREDEFINED_", "GREETING"))}
        info["conf"] = open(conf).read()
        info["conf_mode"] = oct(stat.S_IMODE(os.stat(conf).st_mode))
        info["dir_mode"] = oct(stat.S_IMODE(os.stat(os.path.dirname(conf)).st_mode))
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(os.environ["MESHPROXY_INBOUND_API"])
        srv.listen()
        with open(os.path.join(os.environ["MESHPROXY_WORKDIR"], "..", "app.json"), "w") as f:
            json.dump(info, f)
        conn, _ = srv.accept()
        data = conn.recv(100)
        conn.sendall(b"app saw: " + data)
        conn.close()
        """
    )
    marble.start(
        app, files={"/etc/app.conf": "conf=1\n"}, env={"GREETING": "hello"}, allow=["frontend"]
    )
    ready = marble.ready()
    info_path = marble.base / "app.json"
    deadline = time.monotonic() + 10
    while not info_path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    info = json.loads(info_path.read_text())
    work = str(marble.workdir.resolve())
    assert info["MESHPROXY_WORKDIR"] == work
    assert info["MESHPROXY_INBOUND_API"] == f"{work}/inbound-api.sock"
    assert info["MESHPROXY_OUTBOUND_STORE"] == f"{work}/outbound-store.sock"
    assert info["GREETING"] == "hello"
    assert (info["conf"], info["conf_mode"], info["dir_mode"]) == ("conf=1\n", "0o600", "0o700")
    leaf = pki.cert_from_pem((marble.base / "leaf.pem").read_bytes())
    chain = pki.certs_from_pem(info["MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN"].encode())
    assert chain == [leaf, marble.inter.cert]
    assert pki.cert_from_pem(info["MARBLE_PREDEFINED_ROOT_CA"].encode()) == marble.inter.cert
    assert pki.cert_from_pem(info["MARBLE_PREDEFINED_COORDINATOR_ROOT_CA"].encode()) == (
        marble.ca.cert
    )
    key = serialization.load_pem_private_key(
        info["MARBLE_PREDEFINED_PRIVATE_KEY"].encode(), password=None
    )
    assert pki.public_der(key.public_key()) == pki.public_der(leaf.public_key())  # type: ignore[arg-type]

    # readiness: the file and the admin endpoint agree
    assert ready["outbound"] == {"store": f"{work}/outbound-store.sock"}
    assert ready["admin"] == f"{work}/admin.sock"
    host, port = ready["inbound"]["api"].rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0
    live = subprocess.run(
        ["curl", "-sS", "--unix-socket", ready["admin"], "http://admin/ready"],
        capture_output=True,
        check=True,
    )
    assert live.stdout == b"ready\n"
    for path in (ready["admin"], ready["outbound"]["store"]):
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(work).st_mode & 0o777 == 0o700

    # a frontend marble reaches the app through the inbound listener
    answer = _mtls_request(marble, int(port), b"ping")
    assert answer == b"app saw: ping"
    assert marble.wait() == 0
    accept = marble.events("inbound.accept")[0]
    assert accept["peer"] == f"spiffe://{DOMAIN}/marble/frontend"
    secret_line = (marble.base / "leaf.key").read_bytes().splitlines()[1]
    assert secret_line not in marble.stderr  # the key is in the app's env, never in a log
    assert b"PRIVATE KEY" not in marble.stderr


def _mtls_request(marble: Marble, port: int, data: bytes) -> bytes:
    now = datetime.now(UTC)
    key = pki.generate_key()
    cert = pki.issue_leaf(
        marble.inter,
        pki.make_csr(key, "frontend", []),
        trust_domain=DOMAIN,
        marble_type="frontend",
        instance=uuid.uuid4(),
        dns_names=[],
        lifetime=timedelta(hours=1),
        now=now,
        simulated=True,
    )
    from meshproxy.tls import TLSIdentity, client_context

    ctx = client_context(
        TLSIdentity(
            pki.certs_to_pem([cert, marble.inter.cert]),
            pki.key_to_pem(key),
            pki.cert_to_pem(marble.inter.cert),
        )
    )
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(data)
        received = b""
        while chunk := _recv(tls):
            received += chunk
        return received


def _recv(tls: ssl.SSLSocket) -> bytes:
    try:
        return tls.recv(4096)
    except (ssl.SSLEOFError, ConnectionResetError):
        return b""


# -- before the loop: files, uuid, measurement, activation retries -------------------------
def test_manifest_files_cannot_escape_the_files_root(tmp_path: Path) -> None:
    root = tmp_path / "files"
    with pytest.raises(Exception, match="escapes the files root"):
        write_files(root, {"/etc/../../outside": b"x"})
    assert not (tmp_path / "outside").exists()
    (root / "etc").mkdir(parents=True)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(Exception, match="is a symlink"):
        write_files(root, {"/link/x": b"x"})
    written = write_files(root, {"/etc/a/b.txt": b"data", "top": b"t"})
    assert [p.read_bytes() for p in written] == [b"data", b"t"]
    assert written[0].stat().st_mode & 0o777 == 0o600
    assert (root / "etc" / "a").stat().st_mode & 0o777 == 0o700


def test_the_instance_uuid_is_created_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "uuid"
    first = instance_uuid(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert instance_uuid(path) == first
    path.write_text("not a uuid")
    with pytest.raises(Exception, match="does not hold a UUID"):
        instance_uuid(path)


class FakeClock:
    """Time as a value: the retry loop reads it and sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _attempts(*outcomes: Exception | str) -> Callable[[float], Any]:
    queue = list(outcomes)

    def attempt(timeout: float) -> Any:
        outcome = queue.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return attempt


def test_activation_retries_with_doubling_backoff_until_it_succeeds() -> None:
    clock = FakeClock()
    attempt = _attempts(
        ConnectError("cannot reach coordinator"),
        CoordinatorError("not ready", http_status=503),
        CoordinatorError("unknown marble type", http_status=400),
        "activated",
    )
    got = activate_with_retry("c:2001", attempt, timeout=60, clock=clock, sleep=clock.sleep)
    assert got == "activated"
    assert clock.sleeps == [0.2, 0.4, 0.8]


def test_activation_gives_up_after_the_timeout_with_the_last_reason() -> None:
    clock = FakeClock()
    attempt = _attempts(
        *[CoordinatorError("no", http_status=503)] * 20,
        CoordinatorError("marble type 'x' is not in the manifest", http_status=400),
    )
    with pytest.raises(CoordinatorError) as err:
        activate_with_retry("c:2001", attempt, timeout=30, clock=clock, sleep=clock.sleep)
    assert clock.sleeps[:6] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    assert max(clock.sleeps) == 5.0
    n = len(clock.sleeps) + 1
    assert str(err.value) == (
        f"could not activate with coordinator c:2001 after {n} attempts in {clock.now:.0f}s: no"
    )


def test_trust_failures_are_not_retried() -> None:
    clock = FakeClock()
    attempt = _attempts(PKIError("coordinator does not present the pinned root certificate"))
    with pytest.raises(PKIError, match="pinned root"):
        activate_with_retry("c:2001", attempt, timeout=60, clock=clock, sleep=clock.sleep)
    assert clock.sleeps == []


def test_activation_failure_through_the_cli_names_the_coordinator(tmp_path: Path) -> None:
    """The real `meshproxy run` up to activation, against a port where nobody listens."""
    signed, _ = _signed_enclave(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    config = {
        "coordinator": {"address": f"127.0.0.1:{port}", "activation_timeout": "1s"},
        "marble": {"type": "backend"},
        "attestation": {
            "provider": "simulation",
            "enclave": str(signed),
            "accept_simulation": True,
            "platform_dir": str(tmp_path / "plat"),
        },
        "workdir": str(tmp_path / "work"),
    }
    (tmp_path / "marble.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshproxy",
            "run",
            "--config",
            str(tmp_path / "marble.yaml"),
            "--",
            "true",
        ],
        capture_output=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=30,
        check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        f"meshproxy: error: could not activate with coordinator 127.0.0.1:{port}"
    )
    assert "attempts in 1s" in last or "attempts in 0s" in last
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    events = [line.get("event") for line in lines]
    assert "attestation.simulation" in events  # the warning, at every start
    assert "activation.retry" in events
    assert any("native" in str(line.get("detail")) for line in lines)  # the TLS backend line


def _signed_enclave(tmp_path: Path) -> tuple[Path, Path]:
    from meshproxy.attestation import load_description, sign_description, write_signed

    (tmp_path / "app.py").write_text("print('the app')\n")
    desc = tmp_path / "app.enclave.yaml"
    desc.write_text(
        yaml.safe_dump(
            {
                "name": "app",
                "product_id": 1,
                "security_version": 1,
                "debug": False,
                "files": ["app.py"],
            }
        )
    )
    signed = tmp_path / "app.signed.json"
    write_signed(sign_description(load_description(desc), pki.generate_key()), signed)
    return signed, tmp_path / "app.py"


def test_a_changed_measured_file_stops_the_proxy_naming_the_file(tmp_path: Path) -> None:
    from meshproxy.config import load_marble_config

    signed, app = _signed_enclave(tmp_path)
    config = {
        "coordinator": {"address": "127.0.0.1:1"},
        "marble": {"type": "backend"},
        "attestation": {
            "provider": "simulation",
            "enclave": signed.name,
            "platform_dir": str(tmp_path / "plat"),
        },
        "workdir": "work",
    }
    (tmp_path / "marble.yaml").write_text(yaml.safe_dump(config))
    cfg = load_marble_config(tmp_path / "marble.yaml")
    provider = quote_provider(cfg)  # measures as signed
    assert provider.simulated
    app.write_text("print('tampered')\n")
    with pytest.raises(AttestationError) as err:
        quote_provider(cfg)
    assert "app.signed.json" in str(err.value)
    assert "'app.py' changed since signing" in str(err.value)


# -- the command line ----------------------------------------------------------------------
def _run_parser() -> argparse.ArgumentParser:
    from meshproxy.cli import run as run_command

    parser = argparse.ArgumentParser(prog="meshproxy")
    run_command.register(parser.add_subparsers(dest="command"))
    return parser


def test_the_app_command_line_is_everything_after_the_double_dash() -> None:
    from meshproxy.cli.run import app_argv

    args = _run_parser().parse_args(
        ["run", "--config", "m.yaml", "--", "python3", "app.py", "--config", "x"]
    )
    assert args.config == Path("m.yaml")
    assert app_argv(args.argv) == ["python3", "app.py", "--config", "x"]
    assert app_argv(_run_parser().parse_args(["run", "--config", "m.yaml"]).argv) == []


def test_run_help_explains_the_environment_of_the_app() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    for name in (
        "MESHPROXY_INBOUND_<NAME>",
        "MESHPROXY_OUTBOUND_<NAME>",
        "MESHPROXY_WORKDIR",
        "MESHPROXY_FILES_ROOT",
        "MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN",
        "MARBLE_PREDEFINED_ROOT_CA",
        "MARBLE_PREDEFINED_COORDINATOR_ROOT_CA",
        "MARBLE_PREDEFINED_PRIVATE_KEY",
    ):
        assert name in proc.stdout
