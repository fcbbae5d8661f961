"""Enclave descriptions, simulated measurement, signing, and ``meshproxy enclave``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import sys
import types
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import meshproxy.cli
from meshproxy.attestation import (
    EnclaveDescription,
    PackagePolicy,
    SignedEnclave,
    SimulationPlatform,
    SimulationProvider,
    _enclave,
    _tree,
    check_measurement,
    check_package,
    load_description,
    load_signed,
    measure,
    sign_description,
    simulation_anchor,
    verify_quote,
    write_signed,
)
from meshproxy.cli import enclave as enclave_cli
from meshproxy.errors import AttestationError, ConfigError

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DESCRIPTION = """\
name: backend
product_id: 3
security_version: 2
debug: false
files: [app.py, conf/app.yaml]
"""


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    d = tmp_path / "app"
    (d / "conf").mkdir(parents=True)
    (d / "app.py").write_text("print('hello')\n")
    (d / "conf" / "app.yaml").write_text("port: 8080\n")
    (d / "enclave.yaml").write_text(DESCRIPTION)
    return d


@pytest.fixture
def desc(app_dir: Path) -> EnclaveDescription:
    return load_description(app_dir / "enclave.yaml")


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# -- descriptions ----------------------------------------------------------------------
def test_description_is_loaded(desc: EnclaveDescription, app_dir: Path) -> None:
    assert desc.name == "backend"
    assert (desc.product_id, desc.security_version, desc.debug) == (3, 2, False)
    assert desc.files == ("app.py", "conf/app.yaml")
    assert desc.path == (app_dir / "enclave.yaml").absolute()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (DESCRIPTION + "debgu: true\n", "enclave.yaml: unknown key 'debgu'"),
        (DESCRIPTION.replace("product_id: 3", "product_id: 70000"), "product_id: must be at most"),
        (DESCRIPTION.replace("debug: false", "debug: 0"), "debug: expected true or false"),
        (DESCRIPTION.replace("name: backend\n", ""), "missing required key 'name'"),
        (DESCRIPTION.replace("[app.py, conf/app.yaml]", "[]"), "at least one file"),
        (DESCRIPTION.replace("app.py,", "/etc/passwd,"), r"files\[0\]: '/etc/passwd': paths"),
        (DESCRIPTION.replace("app.py,", "../x,"), r"files\[0\]: '../x'"),
        (DESCRIPTION.replace("app.py,", "conf/app.yaml,"), "listed twice"),
    ],
)
def test_invalid_description_names_file_and_key(app_dir: Path, text: str, message: str) -> None:
    (app_dir / "enclave.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_description(app_dir / "enclave.yaml")


# -- measurement -----------------------------------------------------------------------
def test_measurement_covers_files_and_metadata(desc: EnclaveDescription, app_dir: Path) -> None:
    uid, digests = measure(desc)
    assert len(uid) == 32
    assert digests == {
        "app.py": hashlib.sha256(b"print('hello')\n").hexdigest(),
        "conf/app.yaml": hashlib.sha256(b"port: 8080\n").hexdigest(),
    }
    assert measure(desc)[0] == uid
    (app_dir / "app.py").write_text("print('bye')\n")
    assert measure(desc)[0] != uid
    (app_dir / "app.py").write_text("print('hello')\n")
    changes: list[dict[str, Any]] = [
        {"security_version": 3},
        {"product_id": 4},
        {"debug": True},
        {"name": "x"},
    ]
    for change in changes:
        assert measure(dataclasses.replace(desc, **change))[0] != uid, change


def test_missing_file_at_measurement_is_a_config_error(
    desc: EnclaveDescription, app_dir: Path
) -> None:
    (app_dir / "app.py").unlink()
    with pytest.raises(ConfigError, match=r"enclave\.yaml: files: 'app\.py' not found"):
        measure(desc)


# -- signing and checking --------------------------------------------------------------
def test_sign_write_load_check(
    desc: EnclaveDescription, key: ec.EllipticCurvePrivateKey, app_dir: Path
) -> None:
    signed = sign_description(desc, key)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert signed.signer_id == hashlib.sha256(spki).digest()
    assert signed.unique_id == measure(desc)[0]
    path = app_dir / "backend.signed.json"
    write_signed(signed, path)
    loaded = load_signed(path)
    assert loaded == signed
    identity = check_measurement(loaded, app_dir)
    assert identity == signed.identity()
    assert (identity.product_id, identity.security_version, identity.debug) == (3, 2, False)


def test_ed25519_signer_is_accepted(desc: EnclaveDescription, app_dir: Path) -> None:
    signed = sign_description(desc, ed25519.Ed25519PrivateKey.generate())
    write_signed(signed, app_dir / "s.json")
    assert load_signed(app_dir / "s.json") == signed


def test_rsa_signer_is_refused(desc: EnclaveDescription) -> None:
    with pytest.raises(ConfigError, match="P-256 or Ed25519"):
        sign_description(desc, rsa.generate_private_key(65537, 2048))


def test_changed_file_fails_the_measurement_naming_it(
    desc: EnclaveDescription, key: ec.EllipticCurvePrivateKey, app_dir: Path
) -> None:
    signed = sign_description(desc, key)
    (app_dir / "conf" / "app.yaml").write_text("port: 9090\n")
    with pytest.raises(AttestationError, match=r"'conf/app\.yaml' changed since signing") as info:
        check_measurement(signed, app_dir)
    assert info.value.check == "measurement"
    (app_dir / "conf" / "app.yaml").unlink()
    with pytest.raises(AttestationError, match=r"'conf/app\.yaml' is missing"):
        check_measurement(signed, app_dir)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("security_version", 9, "signature does not verify"),
        ("debug", True, "signature does not verify"),
        ("files", {"app.py": "00" * 32, "conf/app.yaml": "00" * 32}, "signature does not verify"),
        ("signer_id", "00" * 32, "signer_id: is not SHA-256 of signer_public_key"),
        ("signature", "AAAA", "signature does not verify"),
        ("signature", "***", "signature: not base64"),
        ("unique_id", "zz", "unique_id: not hex"),
        ("extra", 1, "unknown key 'extra'"),
    ],
)
def test_tampered_signed_file_fails_to_load(
    desc: EnclaveDescription,
    key: ec.EllipticCurvePrivateKey,
    app_dir: Path,
    field: str,
    value: object,
    message: str,
) -> None:
    path = app_dir / "backend.signed.json"
    write_signed(sign_description(desc, key), path)
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=f"backend.signed.json: .*{message}"):
        load_signed(path)


def test_re_signed_with_another_key_changes_only_the_signer(
    desc: EnclaveDescription, key: ec.EllipticCurvePrivateKey
) -> None:
    a = sign_description(desc, key)
    b = sign_description(desc, ec.generate_private_key(ec.SECP256R1()))
    assert a.unique_id == b.unique_id
    assert a.signer_id != b.signer_id


def test_meshproxy_entry_measures_the_package_tree(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub" / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "sub" / "mod.py").write_text("y = 2\n")
    (pkg / "sub" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"junk")
    monkeypatch.setattr(_enclave, "_package_dir", lambda: pkg)
    d = tmp_path / "app"
    d.mkdir()
    (d / "enclave.yaml").write_text(DESCRIPTION.replace("[app.py, conf/app.yaml]", "[meshproxy]"))
    desc = load_description(d / "enclave.yaml")
    signed = sign_description(desc, key)
    assert [entry for entry, _ in signed.files] == ["meshproxy"]
    (pkg / "notes.txt").write_text("not code")
    check_measurement(signed, d)
    (pkg / "sub" / "new.py").write_text("evil = True\n")
    with pytest.raises(AttestationError, match="installed meshproxy package changed"):
        check_measurement(signed, d)


def _pyc(source: str, header: bytes) -> bytes:
    import marshal

    return header.ljust(16, b"\0") + marshal.dumps(compile(source, "mod.py", "exec"))


def _stamp(source: Path, *, mtime_offset: int = 0) -> bytes:
    """A timestamp pyc header for ``source`` (valid with offset 0, stale otherwise)."""
    import importlib.util

    st = source.stat()
    mtime = (int(st.st_mtime) + mtime_offset) & 0xFFFFFFFF
    return (
        importlib.util.MAGIC_NUMBER + bytes(4) + mtime.to_bytes(4, "little")
        + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    )  # fmt: skip


def _stand_in_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source_text: str
) -> tuple[Path, Path, Path]:
    """A package measured in meshproxy's place: ``pkg/mod.py`` holding ``source_text``;
    returns the package, the source and where its bytecode goes (not written yet)."""
    pkg = tmp_path / "pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    source = pkg / "mod.py"
    source.write_text(source_text)
    monkeypatch.setattr(_enclave, "_package_dir", lambda: pkg)
    return pkg, source, pkg / "__pycache__" / "mod.cpython-311.pyc"


def _signed_over_package(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> tuple[SignedEnclave, Path]:
    """An enclave description measuring only the package, signed now, and its directory."""
    d = tmp_path / "app"
    d.mkdir()
    (d / "enclave.yaml").write_text(DESCRIPTION.replace("[app.py, conf/app.yaml]", "[meshproxy]"))
    return sign_description(load_description(d / "enclave.yaml"), key), d


def test_bytecode_that_would_load_is_measured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    """Python runs a cached .pyc instead of its source when the header matches, and the
    header does not bind the code: swapped, added or stray bytecode changes the
    measurement; another install's timestamps do not."""
    pkg, source, pyc = _stand_in_package(monkeypatch, tmp_path, "x = 1\n")
    pyc.write_bytes(_pyc("x = 1\n", _stamp(source)))
    signed, d = _signed_over_package(tmp_path, key)
    os.utime(source, (1_700_000_000, 1_700_000_000))  # installed elsewhere: other mtimes
    pyc.write_bytes(_pyc("x = 1\n", _stamp(source)))
    check_measurement(signed, d)
    for path, data in (
        (pyc, _pyc("x = 'evil'\n", _stamp(source))),  # other code under a valid header
        (pkg / "__pycache__" / "new.cpython-311.opt-1.pyc", _pyc("", b"")),  # added
        (pkg / "stray.pyc", _pyc("", b"")),  # sourceless bytecode imports too
    ):
        before = path.read_bytes() if path.exists() else None
        path.write_bytes(data)
        with pytest.raises(AttestationError, match="installed meshproxy package changed"):
            check_measurement(signed, d)
        if before is None:
            path.unlink()
        else:
            path.write_bytes(before)
    check_measurement(signed, d)


def test_a_stale_pyc_cannot_be_brought_to_run_by_its_header(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    """Bytecode of old code left next to a newer source was signed as not running;
    rewriting its header so that it would run changes the measurement."""
    _, source, pyc = _stand_in_package(monkeypatch, tmp_path, "fixed = True\n")
    pyc.write_bytes(_pyc("fixed = False\n", _stamp(source, mtime_offset=-60)))  # stale
    signed, d = _signed_over_package(tmp_path, key)
    check_measurement(signed, d)
    pyc.write_bytes(_pyc("fixed = False\n", _stamp(source)))  # now it would run
    with pytest.raises(AttestationError, match="installed meshproxy package changed"):
        check_measurement(signed, d)


def test_meshproxy_processes_write_no_bytecode() -> None:
    """What a start loads would otherwise add bytecode after signing (attestation._tree),
    also where the environment does not say PYTHONDONTWRITEBYTECODE."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out = subprocess.run(
        [sys.executable, "-c", "import sys, meshproxy; print(sys.dont_write_bytecode)"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "True"


def test_signed_enclave_attests_end_to_end(
    desc: EnclaveDescription, key: ec.EllipticCurvePrivateKey, app_dir: Path, tmp_path: Path
) -> None:
    signed = sign_description(desc, key)
    identity = check_measurement(signed, app_dir)
    platform = SimulationPlatform.load_or_create(tmp_path / "platform", now=NOW)
    quote = SimulationProvider(platform, identity).get_quote(b"nonce")
    verified = verify_quote(quote, [simulation_anchor(platform)], now=NOW)
    assert verified.identity == identity
    policy = PackagePolicy(None, signed.signer_id, 3, 2, False)
    check_package(verified, policy, allow_simulation=True)


# -- meshproxy enclave -----------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this group's commands; other groups are other engineers' work in progress."""
    quote_group = types.ModuleType("_test_quote_group")
    quote_group.register = enclave_cli.register_quote  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_test_quote_group", quote_group)
    monkeypatch.setattr(meshproxy.cli, "_GROUPS", ("meshproxy.cli.enclave", "_test_quote_group"))


@pytest.mark.usefixtures("cli")
def test_cli_keygen_sign_and_ids(app_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_path = app_dir / "signer.pem"
    assert meshproxy.cli.main(["enclave", "keygen", "-o", str(key_path)]) == 0
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    signer_line = capsys.readouterr().out.splitlines()[-1]
    assert meshproxy.cli.main(["enclave", "keygen", "-o", str(key_path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err

    desc = app_dir / "enclave.yaml"
    assert meshproxy.cli.main(["enclave", "sign", str(desc), "--key", str(key_path)]) == 0
    out = capsys.readouterr().out
    signed_path = app_dir / "enclave.signed.json"
    signed = load_signed(signed_path)
    assert f"UniqueID: {signed.unique_id.hex()}" in out
    assert signer_line == f"SignerID: {signed.signer_id.hex()}"

    assert meshproxy.cli.main(["enclave", "uniqueid", str(signed_path)]) == 0
    assert capsys.readouterr().out == signed.unique_id.hex() + "\n"
    assert meshproxy.cli.main(["enclave", "uniqueid", str(desc)]) == 0
    assert capsys.readouterr().out == signed.unique_id.hex() + "\n"
    assert meshproxy.cli.main(["enclave", "signerid", str(signed_path)]) == 0
    assert capsys.readouterr().out == signed.signer_id.hex() + "\n"

    out_path = app_dir / "elsewhere.json"
    argv = ["enclave", "sign", str(desc), "--key", str(key_path), "-o", str(out_path)]
    assert meshproxy.cli.main(argv) == 0
    assert load_signed(out_path).unique_id == signed.unique_id


@pytest.mark.usefixtures("cli")
def test_cli_errors_are_one_line(app_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    desc = str(app_dir / "enclave.yaml")
    assert meshproxy.cli.main(["enclave", "sign", desc, "--key", str(app_dir / "nokey")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshproxy: error: ")
    assert "nokey" in err
    assert len(err.strip().splitlines()) == 1
    (app_dir / "bad.pem").write_text("not a key")
    assert meshproxy.cli.main(["enclave", "sign", desc, "--key", str(app_dir / "bad.pem")]) == 2
    assert "not a PEM private key" in capsys.readouterr().err
    assert meshproxy.cli.main(["enclave", "signerid", desc]) == 2
    assert "missing required key" in capsys.readouterr().err


@pytest.mark.usefixtures("cli")
@pytest.mark.parametrize(
    "argv",
    [
        ["enclave", "--help"],
        ["enclave", "sign", "--help"],
        ["enclave", "uniqueid", "--help"],
        ["enclave", "signerid", "--help"],
        ["enclave", "keygen", "--help"],
        ["quote", "--help"],
        ["quote", "verify", "--help"],
    ],
)
def test_cli_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        meshproxy.cli.main(argv)
    assert info.value.code == 0
    assert "usage: meshproxy" in capsys.readouterr().out


def test_a_digest_sent_by_the_proxy_is_used_once(tmp_path: Path) -> None:
    """meshproxy run measures the package in the proxy while its agent loads its modules;
    the agent uses that digest once, and a later measurement hashes the files again."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("x = 1\n")
    (pkg / "mod.py").write_text("y = 2\n")
    first = _tree.package_digest(pkg)
    read, write = os.pipe()
    _tree.send_digest(pkg, write)
    (pkg / "mod.py").write_text("y = 3\n")  # after the proxy measured
    _tree.expect_digest(pkg, read)
    assert _tree.package_digest(pkg) == first  # what was measured, sent
    assert _tree.package_digest(pkg) != first  # spent: the files are read again


def test_when_the_proxy_cannot_measure_the_agent_measures_and_reports(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    read, write = os.pipe()
    _tree.send_digest(missing, write)
    _tree.expect_digest(missing, read)
    with pytest.raises(FileNotFoundError):
        _tree.package_digest(missing)
