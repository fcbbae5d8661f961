"""Recovery with the real CLI: the sealed state moved to another (simulated) machine opens
only with the recovery keys' holders, each decrypting their own secret locally."""

from __future__ import annotations

import json
from pathlib import Path

from integration.harness import Cluster
from integration.test_lifecycle_env import (
    make_recovery_key,
    make_user,
    package,
    write_manifest,
)


def test_two_of_three_key_holders_recover_the_state_on_another_machine(tmp_path: Path) -> None:
    keys = [make_recovery_key(tmp_path / "keys", n) for n in ("ops", "sec", "cto")]
    alice = make_user(tmp_path / "users", "alice")
    doc = {
        "Packages": {"app": package()},
        "Marbles": {"app": {"Package": "app"}},
        "Secrets": {"token": {"Type": "plain", "UserDefined": True}},
        "Users": {"alice": {"Certificate": alice.pem, "Roles": ["rw"]}},
        "Roles": {
            "rw": {
                "ResourceType": "Secrets",
                "ResourceNames": ["token"],
                "Actions": ["ReadSecret", "WriteSecret"],
            }
        },
        "RecoveryKeys": {k.name: k.public_pem for k in keys},
        "Config": {"RecoveryThreshold": 2},
    }
    path = write_manifest(tmp_path / "m.json", doc)
    secrets_dir = tmp_path / "recovery"
    other_machine = tmp_path / "other-machine"
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        co = ["--coordinator", c.client_addr, "--accept-simulation"]
        out = c.cli("manifest", "set", str(path), *co, "--recovery-dir", str(secrets_dir))
        assert sorted(json.loads(out.stdout)) == ["cto", "ops", "sec"]
        for k in keys:
            assert "recovery secret saved to" in out.stderr
            assert (secrets_dir / f"{k.name}.recovery-secret").stat().st_mode & 0o777 == 0o600
        c.cli("secret", "set", "token", "--value", "kept-across-recovery", *co, *alice.args())
        root_before = c.cli("certificate", "root", *co).stdout
        c.procs[0].stop()

        # The state directory is copied to a machine whose platform cannot unseal it.
        c.start_coordinator(
            name="moved", extra=("--simulation", "--platform-dir", str(other_machine))
        )
        co = ["--coordinator", c.client_addr, "--accept-simulation",
              "--platform-dir", str(other_machine)]  # fmt: skip
        assert c.cli("status", *co).stdout.startswith("1: ")
        assert c.cli("certificate", "root", *co).stdout != root_before  # a temporary root

        wrong = c.cli(
            "recover", *co, "--secret", str(secrets_dir / "ops.recovery-secret"),
            "--key", str(keys[1].private), check=False,
        )  # fmt: skip
        assert wrong.returncode != 0
        assert "cannot decrypt it with this key" in wrong.stderr
        first = c.cli(
            "recover", *co, "--secret", str(secrets_dir / "ops.recovery-secret"),
            "--key", str(keys[0].private),
        )  # fmt: skip
        assert "1 more recovery secret(s) needed" in first.stderr
        again = c.cli(
            "recover", *co, "--secret", str(secrets_dir / "ops.recovery-secret"),
            "--key", str(keys[0].private), check=False,
        )  # fmt: skip
        assert "already uploaded" in again.stderr
        done = c.cli(
            "recover", *co, "--secret", str(secrets_dir / "cto.recovery-secret"),
            "--key", str(keys[2].private),
        )  # fmt: skip
        assert "coordinator recovered" in done.stderr
        assert c.cli("status", *co).stdout.startswith("3: ")
        assert c.cli("certificate", "root", *co).stdout == root_before
        got = json.loads(c.cli("secret", "get", "token", *co, *alice.args()).stdout)
        assert got["token"]["Public"] == "a2VwdC1hY3Jvc3MtcmVjb3Zlcnk="  # kept-across-recovery
        last = json.loads(c.cli("manifest", "log", *co).stdout.splitlines()[-1])
        assert last["update"] == "Coordinator recovered"
        assert last["recoveryKeys"] == ["cto", "ops"]
        # Sealed for the new machine now: a restart there comes up without recovery.
        c.procs[-1].stop()
        c.start_coordinator(
            name="moved-restarted", extra=("--simulation", "--platform-dir", str(other_machine))
        )
        co[1] = c.client_addr
        assert c.cli("status", *co).stdout.startswith("3: ")
        for proc in c.procs:
            log = proc.log.read_text()
            assert "kept-across-recovery" not in log
            assert "PRIVATE KEY" not in log
