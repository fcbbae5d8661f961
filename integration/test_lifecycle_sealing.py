"""The coordinator's platform sealers with real processes: Gramine's sealing keys laid out in
a stand-in ``/dev/attestation/keys`` (``--device-dir``), the manifest's SealMode choosing
MRSIGNER or MRENCLAVE, and ``--seal none``, which enters recovery mode at every restart."""

from __future__ import annotations

import base64
import os
from pathlib import Path

from integration.harness import Cluster
from integration.test_lifecycle_env import make_recovery_key, package, write_manifest

RECOVERING, ACCEPTING_MARBLES = "1: ", "3: "


def gramine_dev(base: Path) -> tuple[Path, dict[str, bytes]]:
    keys_dir = base / "dev" / "attestation" / "keys"
    keys_dir.mkdir(parents=True)
    keys = {name: os.urandom(16) for name in ("_sgx_mrsigner", "_sgx_mrenclave")}
    for name, key in keys.items():
        (keys_dir / name).write_bytes(key)
    return base / "dev", keys


def rotate(dev: Path, name: str, keys: dict[str, bytes]) -> None:
    """The same machine as seen by another enclave: one of the two keys differs."""
    keys[name] = os.urandom(16)
    (dev / "attestation" / "keys" / name).write_bytes(keys[name])


def assert_no_key_bytes(c: Cluster, keys: list[bytes]) -> None:
    for proc in c.procs:
        log = proc.log.read_bytes()
        for key in keys:
            for form in (key, key.hex().encode(), base64.b64encode(key)):
                assert form not in log, proc.name


def _manifest(tmp_path: Path, seal_mode: str | None, recovery_pem: str) -> Path:
    doc = {
        "Packages": {"app": package()},
        "Marbles": {"app": {"Package": "app"}},
        "RecoveryKeys": {"ops": recovery_pem},
        "Config": {"SealMode": seal_mode} if seal_mode else {},
    }
    return write_manifest(tmp_path / f"manifest-{seal_mode}.json", doc)


def _lifecycle(tmp_path: Path, seal_mode: str | None, changed: str, unchanged: str) -> None:
    dev, keys = gramine_dev(tmp_path)
    seen = list(keys.values())
    recovery = make_recovery_key(tmp_path / "keys", "ops")
    extra = ("--simulation", "--seal", "gramine", "--device-dir", str(dev))
    with Cluster(tmp_path / "cluster") as c:
        c.start_coordinator(extra=extra)
        co = ["--coordinator", c.client_addr, "--accept-simulation"]
        c.cli("manifest", "set", str(_manifest(tmp_path, seal_mode, recovery.public_pem)), *co,
              "--recovery-dir", str(tmp_path / "rec"))  # fmt: skip
        root = c.cli("certificate", "root", *co).stdout

        def restart(name: str, rotated: str | None, expect: str) -> None:
            c.procs[-1].stop()
            if rotated is not None:
                rotate(dev, rotated, keys)
                seen.append(keys[rotated])
            c.start_coordinator(name=name, extra=extra)
            co[1] = c.client_addr
            assert c.cli("status", *co).stdout.startswith(expect), name

        # A new build of the coordinator (another key for the other policy) still unseals.
        restart("restarted", unchanged, ACCEPTING_MARBLES)
        assert c.cli("certificate", "root", *co).stdout == root
        # The key the SealMode uses changed: recovery mode, and the recovery key opens it.
        restart("other-enclave", changed, RECOVERING)
        c.cli("recover", *co, "--secret", str(tmp_path / "rec" / "ops.recovery-secret"),
              "--key", str(recovery.private))  # fmt: skip
        assert c.cli("status", *co).stdout.startswith(ACCEPTING_MARBLES)
        assert c.cli("certificate", "root", *co).stdout == root
        # Resealed under the new key: the next restart unseals without recovery.
        restart("resealed", None, ACCEPTING_MARBLES)
        assert "cannot unseal state" in c.procs[2].log.read_text()
        assert_no_key_bytes(c, seen)


def test_gramine_product_key_survives_a_new_enclave_build_not_a_new_signer(
    tmp_path: Path,
) -> None:
    _lifecycle(tmp_path, None, changed="_sgx_mrsigner", unchanged="_sgx_mrenclave")


def test_gramine_unique_key_is_lost_with_another_enclave_build(tmp_path: Path) -> None:
    _lifecycle(tmp_path, "UniqueKey", changed="_sgx_mrenclave", unchanged="_sgx_mrsigner")


def test_seal_none_enters_recovery_at_every_restart(tmp_path: Path) -> None:
    recovery = make_recovery_key(tmp_path / "keys", "ops")
    extra = ("--simulation", "--seal", "none")
    with Cluster(tmp_path / "cluster") as c:
        c.start_coordinator(extra=extra)
        co = ["--coordinator", c.client_addr, "--accept-simulation"]
        c.cli("manifest", "set", str(_manifest(tmp_path, None, recovery.public_pem)), *co,
              "--recovery-dir", str(tmp_path / "rec"))  # fmt: skip
        for n in range(2):
            c.procs[-1].stop()
            c.start_coordinator(name=f"restart-{n}", extra=extra)
            co[1] = c.client_addr
            assert c.cli("status", *co).stdout.startswith(RECOVERING)
            c.cli("recover", *co, "--secret", str(tmp_path / "rec" / "ops.recovery-secret"),
                  "--key", str(recovery.private))  # fmt: skip
            assert c.cli("status", *co).stdout.startswith(ACCEPTING_MARBLES)
        first = c.procs[0].log.read_text()
        assert "SEALING DISABLED (--seal none)" in first
        assert "STATE KEY NOT SEALED (--seal none): the next restart enters recovery" in first
        assert "sealing is disabled (--seal none)" in c.procs[1].log.read_text()


def test_seal_gramine_outside_gramine_is_a_clear_error(tmp_path: Path) -> None:
    with Cluster(tmp_path) as c:
        res = c.cli("coordinator", "--state-dir", str(tmp_path / "s"), "--simulation",
                    "--seal", "gramine", "--device-dir", str(tmp_path / "nodev"),
                    check=False)  # fmt: skip
        assert res.returncode != 0
        assert "_sgx_mrsigner does not exist: not running under Gramine SGX" in res.stderr
        assert "Traceback" not in res.stderr
        res = c.cli("coordinator", "--state-dir", str(tmp_path / "s"), "--seal", "simulation",
                    check=False)  # fmt: skip
        assert "--seal simulation needs --simulation" in res.stderr
