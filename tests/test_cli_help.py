"""Every command answers --help, and user errors are one line without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy.cli import main

COMMANDS = [
    ["coordinator"],
    ["manifest", "set"],
    ["manifest", "get"],
    ["manifest", "verify"],
    ["certificate", "root"],
    ["certificate", "intermediate"],
    ["certificate", "chain"],
    ["status"],
    ["run"],
    ["enclave", "sign"],
    ["enclave", "keygen"],
    ["enclave", "uniqueid"],
    ["enclave", "signerid"],
    ["quote", "verify"],
    ["secret", "get"],
    ["secret", "set"],
    ["recover"],
    ["manifest", "log"],
    ["manifest", "update", "apply"],
    ["manifest", "update", "acknowledge"],
    ["manifest", "update", "cancel"],
    ["manifest", "update", "get"],
    ["enclave", "gramine-manifest"],
    ["enclave", "occlum-config"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: meshproxy " + " ".join(command))


def test_unreachable_coordinator_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "status",
            "--coordinator",
            "127.0.0.1:1",
            "--accept-simulation",
            "--platform-dir",
            "/nonexistent",
        ]
    )
    err = capsys.readouterr().err
    assert status != 0
    assert err.startswith("meshproxy: error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_manifest_file_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    status = main(["manifest", "set", str(tmp_path / "nope.json"), "--coordinator", "h:1"])
    err = capsys.readouterr().err
    assert status == 2
    assert "nope.json" in err
    assert "Traceback" not in err


def test_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["status", "--coordinator", "no-port", "--root", "/dev/null"])
    err = capsys.readouterr().err
    assert status != 0
    assert "Traceback" not in err
