"""The coordinator's commands: every one answers --help; user errors are one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshproxy.cli import main
from meshproxy.cli.recover import decrypt_secret
from meshproxy.coordinator import recovery_padding
from meshproxy.errors import UsageError

COMMANDS = [
    ["secret", "get"],
    ["secret", "set"],
    ["recover"],
    ["manifest", "log"],
    ["manifest", "update", "apply"],
    ["manifest", "update", "acknowledge"],
    ["manifest", "update", "cancel"],
    ["manifest", "update", "get"],
    ["coordinator"],
    ["manifest", "set"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: meshproxy " + " ".join(command))


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(argv)
    err = capsys.readouterr().err
    assert err.startswith("meshproxy: error: "), err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    return status, err


def test_user_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coordinator = ["--coordinator", "127.0.0.1:1", "--root", str(tmp_path / "none.pem")]
    status, err = one_line_error(
        ["secret", "set", "x", "--from-file", str(tmp_path / "missing"), *coordinator,
         "--cert", str(tmp_path / "c.pem"), "--key", str(tmp_path / "k.pem")],
        capsys,
    )  # fmt: skip
    assert status == 2
    assert "c.pem" in err
    key = tmp_path / "not-rsa.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    secret = tmp_path / "s"
    secret.write_bytes(b"x" * 256)
    status, err = one_line_error(
        ["recover", *coordinator, "--secret", str(secret), "--key", str(key)], capsys
    )
    assert status == 2
    assert "a recovery key is an RSA key" in err
    status, err = one_line_error(
        ["coordinator", "--state-dir", str(tmp_path), "--store", "etcd", "--simulation"], capsys
    )
    assert status == 2
    assert "--etcd-endpoints" in err


def test_recovery_secret_files_decrypt_raw_or_base64() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    blob = key.public_key().encrypt(b"s" * 32, recovery_padding())
    import base64

    assert decrypt_secret(blob, key, "f") == b"s" * 32
    assert decrypt_secret(base64.b64encode(blob) + b"\n", key, "f") == b"s" * 32
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(UsageError, match="cannot decrypt"):
        decrypt_secret(blob, other, "f")
    with pytest.raises(UsageError, match="cannot decrypt"):
        decrypt_secret(b"short", key, "f")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seal", "simulation"], "--seal simulation needs --simulation"),
        (["--simulation", "--device-dir", "/x"], "--device-dir is only for --seal gramine"),
        (["--seal", "none", "--device-dir", "/x"], "--device-dir is only for --seal gramine"),
    ],
)
def test_seal_options_are_checked_before_start(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, err = one_line_error(["coordinator", "--state-dir", str(tmp_path), *argv], capsys)
    assert status == 2
    assert message in err
