"""``manifest verify --policy`` against a real coordinator: the identity is checked before
the manifest and before anything is saved; each refusal names its field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from integration.conftest import Mesh, package

DEMO_POLICY = Path(__file__).parent.parent / "configs" / "demo" / "coordinator-policy.yaml"


def _policy(mesh: Mesh, name: str, **change: Any) -> Path:
    doc = yaml.safe_load(DEMO_POLICY.read_text())
    doc.update(change)
    path = mesh.c.base / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_manifest_verify_checks_the_coordinator_policy_first(mesh: Mesh) -> None:
    c = mesh.c
    manifest = mesh.set_manifest(
        {"Packages": {"p": package(mesh.signer, 1)}, "Marbles": {"m": {"Package": "p"}}}
    )
    saved = c.base / "client-config" / "roots"

    def verify(*extra: str, file: Path = manifest) -> Any:
        return c.cli(
            "manifest", "verify", str(file), "--coordinator", c.client_addr,
            "--accept-simulation", *extra, check=False,
        )  # fmt: skip

    other = c.base / "other.json"
    other.write_text(manifest.read_text() + "\n")
    refusals = [
        (_policy(mesh, "signer", SignerID="00" * 32), manifest, "SignerID: the coordinator is"),
        (_policy(mesh, "product", ProductID=7), manifest, "ProductID: the coordinator is product"),
        (_policy(mesh, "svn", SecurityVersion=9), manifest, "SecurityVersion: the coordinator has"),
        (_policy(mesh, "unique", UniqueID="11" * 32), manifest, "UniqueID: the coordinator is"),
        # The identity is checked before the manifest: the policy's refusal is the one seen.
        (_policy(mesh, "signer2", SignerID="22" * 32), other, "SignerID: the coordinator is"),
    ]
    for policy, file, field in refusals:
        res = verify("--policy", str(policy), file=file)
        assert res.returncode != 0, res.stdout
        assert f"refused by policy {policy}: {field}" in res.stderr
        assert "Traceback" not in res.stderr
        assert res.stderr.count("\n") == 1
        assert not saved.exists() or not any(saved.iterdir()), "root saved despite a refusal"

    bad = c.base / "bad.yaml"
    bad.write_text("SignerID: nothex\nProductID: 1\nSecurityVersion: 1\n")
    res = verify("--policy", str(bad))
    assert res.returncode == 2
    assert "bad.yaml: SignerID: SignerID must be 64 hex digits" in res.stderr

    res = verify("--policy", str(DEMO_POLICY))
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr
    assert f"policy {DEMO_POLICY} holds: SignerID d74da24a" in res.stdout
    assert any(saved.iterdir())

    res = verify()  # today's behaviour, with a warning
    assert res.returncode == 0, res.stderr
    assert "warning: no --policy" in res.stderr
    assert "identity NOT pinned" in res.stdout
