"""Gramine manifest and Occlum.json templates from an enclave description, and the
``meshproxy enclave gramine-manifest`` / ``occlum-config`` commands."""

from __future__ import annotations

import json
import sys
import tomllib
import types
from pathlib import Path

import pytest
import yaml

import meshproxy.cli
from meshproxy.attestation import (
    EnclaveDescription,
    Runtime,
    gramine_manifest,
    load_description,
    occlum_bom,
    occlum_config,
)
from meshproxy.cli import enclave as enclave_cli
from meshproxy.errors import ConfigError

DESCRIPTION = """\
name: backend
product_id: 3
security_version: 2
debug: false
files: [meshproxy, app.py, conf/app.yaml, marble.yaml]
"""
RUNTIME = Runtime(
    python="/usr/bin/python3.11",
    python_dirs=("/usr/lib/python3.11", "/opt/venv/lib/python3.11/site-packages"),
    package_dir="/opt/venv/lib/python3.11/site-packages/meshproxy",
)


@pytest.fixture
def desc(tmp_path: Path) -> EnclaveDescription:
    d = tmp_path / "app"
    (d / "conf").mkdir(parents=True)
    for name in ("app.py", "conf/app.yaml", "marble.yaml"):
        (d / name).write_text("x\n")
    (d / "enclave.yaml").write_text(DESCRIPTION)
    return load_description(d / "enclave.yaml")


def test_gramine_manifest_parses_and_runs_meshproxy(desc: EnclaveDescription) -> None:
    doc = tomllib.loads(gramine_manifest(desc, RUNTIME, env_passthrough=["MESHPROXY_COORD"]))
    base = desc.path.parent.as_posix()
    assert doc["libos"]["entrypoint"] == "/usr/bin/python3.11"
    argv = ["/usr/bin/python3.11", "-m", "meshproxy", "run", "--config", f"{base}/marble.yaml"]
    assert doc["loader"]["argv"] == argv
    assert doc["loader"]["env"]["MESHPROXY_COORD"] == {"passthrough": True}
    assert doc["loader"]["env"]["MESHPROXY_NATIVE"] == "auto"
    sgx = doc["sgx"]
    assert sgx["remote_attestation"] == "dcap"
    assert (sgx["isvprodid"], sgx["isvsvn"], sgx["debug"]) == (3, 2, False)
    assert (sgx["enclave_size"], sgx["max_threads"]) == ("1G", 32)
    trusted = sgx["trusted_files"]
    for name in ("app.py", "conf/app.yaml", "marble.yaml"):
        assert f"file:{base}/{name}" in trusted
    assert "file:/usr/bin/python3.11" in trusted
    assert "file:/opt/venv/lib/python3.11/site-packages/meshproxy/" in trusted
    assert "file:/usr/lib/python3.11/" in trusted
    encrypted = [m for m in doc["fs"]["mounts"] if m.get("type") == "encrypted"]
    assert encrypted == [
        {
            "type": "encrypted",
            "path": "/var/lib/meshproxy/sealed",
            "uri": "file:sealed",
            "key_name": "meshproxy_sealing",
        }
    ]
    assert doc["sys"]["enable_extra_runtime_domain_names_conf"] is True


def test_the_marble_config_must_be_measured(desc: EnclaveDescription) -> None:
    with pytest.raises(ConfigError, match=r"'other\.yaml' is not among the measured files"):
        gramine_manifest(desc, RUNTIME, config="other.yaml")
    with pytest.raises(ConfigError, match="not among the measured files"):
        occlum_config(desc, config="meshproxy")


def test_bad_passthrough_names_are_refused(desc: EnclaveDescription) -> None:
    with pytest.raises(ConfigError, match="not an environment variable name"):
        gramine_manifest(desc, RUNTIME, env_passthrough=["A = 1"])


def test_occlum_config_and_bom(desc: EnclaveDescription) -> None:
    config = json.loads(json.dumps(occlum_config(desc, env_passthrough=["MESHPROXY_COORD"])))
    limits = config["resource_limits"]
    assert {"user_space_size", "kernel_space_heap_size", "max_num_of_threads"} <= set(limits)
    assert config["entry_points"] == ["/bin"]
    assert "MESHPROXY_NATIVE=auto" in config["env"]["default"]
    assert config["env"]["untrusted"] == ["MESHPROXY_COORD"]
    assert config["metadata"]["product_id"] == 3
    assert config["metadata"]["version_number"] == 2
    assert config["metadata"]["debuggable"] is False
    bom = occlum_bom(desc, RUNTIME)
    base = desc.path.parent.as_posix()
    copied = {
        (t["target"], f)
        for t in bom["targets"]
        for c in t["copy"]
        for f in c.get("files", [])  # type: ignore[index,union-attr,attr-defined]
    }
    assert {("/app", f"{base}/app.py"), ("/app/conf", f"{base}/conf/app.yaml")} <= copied
    assert ("/bin", "/usr/bin/python3.11") in copied


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only this group's commands; other groups are other engineers' work in progress."""
    quote_group = types.ModuleType("_test_quote_group")
    quote_group.register = enclave_cli.register_quote  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "_test_quote_group", quote_group)
    monkeypatch.setattr(meshproxy.cli, "_GROUPS", ("meshproxy.cli.enclave", "_test_quote_group"))


@pytest.mark.usefixtures("cli")
def test_cli_writes_the_templates(desc: EnclaveDescription, tmp_path: Path) -> None:
    manifest = tmp_path / "app.manifest.template"
    argv = ["enclave", "gramine-manifest", str(desc.path), "-o", str(manifest),
            "--env-passthrough", "MESHPROXY_X", "--max-threads", "8"]  # fmt: skip
    assert meshproxy.cli.main(argv) == 0
    doc = tomllib.loads(manifest.read_text())
    assert doc["sgx"]["max_threads"] == 8
    assert doc["libos"]["entrypoint"] == sys.executable
    assert f"file:{desc.path.parent.as_posix()}/app.py" in doc["sgx"]["trusted_files"]
    occlum, bom = tmp_path / "Occlum.json", tmp_path / "bom.yaml"
    argv = ["enclave", "occlum-config", str(desc.path), "-o", str(occlum), "--bom", str(bom)]
    assert meshproxy.cli.main(argv) == 0
    assert json.loads(occlum.read_text())["metadata"]["product_id"] == 3
    targets = yaml.safe_load(bom.read_text())["targets"]
    assert any(t["target"] == "/app/conf" for t in targets)


@pytest.mark.usefixtures("cli")
def test_cli_template_to_stdout_and_errors(
    desc: EnclaveDescription, capsys: pytest.CaptureFixture[str]
) -> None:
    assert meshproxy.cli.main(["enclave", "occlum-config", str(desc.path)]) == 0
    assert json.loads(capsys.readouterr().out)["entry_points"] == ["/bin"]
    argv = ["enclave", "gramine-manifest", str(desc.path), "--config", "nope.yaml"]
    assert meshproxy.cli.main(argv) == 2
    assert "not among the measured files" in capsys.readouterr().err
