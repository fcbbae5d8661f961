"""``--policy`` against a real coordinator: ``manifest verify`` checks the identity before
the manifest and before anything is saved, each refusal naming its field; every other
command that verifies the coordinator's quote checks it too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from integration.conftest import Mesh, package
from integration.test_lifecycle_env import make_recovery_key, make_user

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


def test_every_command_that_verifies_the_quote_takes_the_policy(mesh: Mesh) -> None:
    c = mesh.c
    alice = make_user(c.base / "users", "alice")
    holder = make_recovery_key(c.base / "keys", "ops")
    manifest = mesh.set_manifest(
        {
            "Packages": {"p": package(mesh.signer, 1)},
            "Marbles": {"m": {"Package": "p"}},
            "Secrets": {"token": {"Type": "plain", "UserDefined": True}},
            "Users": {"alice": {"Certificate": alice.pem, "Roles": ["rw"]}},
            "Roles": {"rw": {"ResourceType": "Secrets", "ResourceNames": ["token"],
                             "Actions": ["ReadSecret", "WriteSecret"]}},
            "RecoveryKeys": {"ops": holder.public_pem},
        }
    )  # fmt: skip
    co = ["--coordinator", c.client_addr, "--accept-simulation"]
    # A saved root is no way around the policy: --policy always verifies the quote.
    c.cli("manifest", "verify", str(manifest), *co, "--policy", str(DEMO_POLICY))
    refuse = _policy(mesh, "refuse", SignerID="33" * 32)
    families = {
        "status": [["status"]],
        "certificate": [["certificate", which] for which in ("root", "intermediate", "chain")],
        "manifest": [["manifest", "get"], ["manifest", "log"]],
        "secret": [["secret", "set", "token", "--value", "v", *alice.args()],
                   ["secret", "get", "token", *alice.args()]],
        "recover": [["recover", "--secret", str(c.base / "ops.recovery-secret"),
                     "--key", str(holder.private)]],
    }  # fmt: skip
    for family, commands in families.items():
        for command in commands:
            res = c.cli(*command, *co, "--policy", str(refuse), check=False)
            assert res.returncode != 0, (family, res.stdout)
            assert f"refused by policy {refuse}: SignerID: the coordinator is" in res.stderr
            assert "Traceback" not in res.stderr
            res = c.cli(*command, *co, "--policy", str(DEMO_POLICY), check=False)
            if family == "recover":  # trusted, then refused by the coordinator itself
                assert "refused by policy" not in res.stderr
                assert "recovery mode" in res.stderr, res.stderr
            else:
                assert res.returncode == 0, (command, res.stderr)
    assert c.cli("status", *co).stdout.startswith("3: ")  # the saved root, no policy
    res = c.cli("status", *co, "--policy", str(DEMO_POLICY), "--root", "x.pem", check=False)
    assert res.returncode == 2
    assert "--policy and --collateral check the coordinator's quote" in res.stderr
