"""Updates, renewal and rescheduling against a real coordinator: the CLI for operators,
the client library for marbles; a client that pinned the root keeps verifying."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography import x509

from integration.harness import Cluster
from integration.test_lifecycle_env import (
    Marble,
    UserFiles,
    coordinator_args,
    make_recovery_key,
    make_user,
    package,
    write_manifest,
)
from meshproxy.coordinator import client
from meshproxy.errors import CoordinatorError


def manifest(users: dict[str, UserFiles], *, threshold: int = 2) -> dict[str, object]:
    return {
        "Packages": {"app": package(1)},
        "Marbles": {
            "web": {
                "Package": "app",
                "Parameters": {"Files": {"/data.key": "{{ hex .Secrets.seal }}"}},
            }
        },
        "Secrets": {"seal": {"Type": "symmetric-key", "Size": 256}},
        "Users": {
            "alice": {"Certificate": users["alice"].pem, "Roles": ["svn", "manifest"]},
            "bob": {"Certificate": users["bob"].pem, "Roles": ["manifest"]},
            "carol": {"Certificate": users["carol"].pem, "Roles": ["manifest"]},
        },
        "Roles": {
            "svn": {
                "ResourceType": "Packages",
                "ResourceNames": ["app"],
                "Actions": ["UpdateSecurityVersion"],
            },
            "manifest": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
        },
        "Config": {"UpdateThreshold": threshold},
    }


def chain(c: Cluster, root: Path) -> list[x509.Certificate]:
    out = c.cli("certificate", "chain", "--coordinator", c.client_addr, "--root", str(root))
    return x509.load_pem_x509_certificates(out.stdout.encode())


@pytest.fixture
def users(tmp_path: Path) -> dict[str, UserFiles]:
    return {n: make_user(tmp_path / "users", n) for n in ("alice", "bob", "carol")}


def test_package_update_refuses_old_marbles_and_the_pinned_root_still_verifies(
    tmp_path: Path, users: dict[str, UserFiles]
) -> None:
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        co = coordinator_args(c)
        path = write_manifest(tmp_path / "m.json", manifest(users))
        c.cli("manifest", "set", str(path), *co)
        root_pem = tmp_path / "root.pem"
        c.cli("manifest", "verify", str(path), *co, "-o", str(root_pem))
        root = x509.load_pem_x509_certificate(root_pem.read_bytes())
        before = chain(c, root_pem)
        old = Marble(c.base / "sim-platform", "web", svn=1)
        old.activate(c.mesh_addr, root)

        bump = write_manifest(tmp_path / "bump.json", {"Packages": {"app": {"SecurityVersion": 2}}})
        denied = c.cli("manifest", "update", "apply", str(bump), *co, *users["bob"].args(),
                       check=False)  # fmt: skip
        assert "user 'bob' may not UpdateSecurityVersion on 'app'" in denied.stderr
        applied = c.cli("manifest", "update", "apply", str(bump), *co, *users["alice"].args())
        assert "SecurityVersion updated" in applied.stdout

        after = chain(c, root_pem)
        assert after[1] == root
        assert after[0] != before[0]
        after[0].verify_directly_issued_by(root)
        # The manifest itself (and its fingerprint) is unchanged: verify still passes.
        c.cli("manifest", "verify", str(path), *co)
        with pytest.raises(CoordinatorError, match="SecurityVersion 1 is below") as refused:
            old.renew(c.mesh_addr, root)
        assert refused.value.http_status == 403
        with pytest.raises(CoordinatorError, match="SecurityVersion 1 is below"):
            Marble(c.base / "sim-platform", "web", svn=1).activate(c.mesh_addr, root)
        new = Marble(c.base / "sim-platform", "web", svn=2)
        activation = new.activate(c.mesh_addr, root)
        assert activation.intermediate == after[0]
        log = c.cli("manifest", "log", *co).stdout.splitlines()
        assert json.loads(log[-1])["update"] == "SecurityVersion increased"


def test_multi_party_manifest_update_renewal_and_new_recovery_secrets(
    tmp_path: Path, users: dict[str, UserFiles]
) -> None:
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        co = coordinator_args(c)
        path = write_manifest(tmp_path / "m.json", manifest(users))
        c.cli("manifest", "set", str(path), *co)
        root_pem = tmp_path / "root.pem"
        c.cli("manifest", "verify", str(path), *co, "-o", str(root_pem))
        root = x509.load_pem_x509_certificate(root_pem.read_bytes())
        marble = Marble(c.base / "sim-platform", "web")
        first = marble.activate(c.mesh_addr, root)

        doc = manifest(users)
        ops = make_recovery_key(tmp_path / "keys", "ops")
        doc["RecoveryKeys"] = {"ops": ops.public_pem}
        doc["Marbles"]["api"] = {"Package": "app"}  # type: ignore[index]
        new_path = write_manifest(tmp_path / "new.json", doc)
        started = c.cli("manifest", "update", "apply", str(new_path), *co, *alice.args())
        assert "1 acknowledgement(s) missing" in started.stdout
        assert "bob, carol" in started.stdout
        pending = tmp_path / "pending.json"
        shown = c.cli("manifest", "update", "get", *co, "-o", str(pending))
        assert pending.read_bytes() == new_path.read_bytes()
        assert "not yet acknowledged by: bob, carol" in shown.stderr

        wrong = write_manifest(tmp_path / "wrong.json", {**doc, "Config": {"UpdateThreshold": 1}})
        refused = c.cli("manifest", "update", "acknowledge", str(wrong), *co, *bob.args(),
                        check=False)  # fmt: skip
        assert "differs from the pending update" in refused.stderr
        recovery_dir = tmp_path / "recovery"
        done = c.cli(
            "manifest", "update", "acknowledge", str(new_path), *co, *carol.args(),
            "--recovery-dir", str(recovery_dir),
        )  # fmt: skip
        assert "Manifest updated" in done.stdout
        assert (recovery_dir / "ops.recovery-secret").stat().st_size == 256

        # The cluster is verifiable against the new manifest with the same pinned root.
        c.cli("manifest", "verify", str(new_path), *co)
        new_chain = chain(c, root_pem)
        assert new_chain[1] == root
        assert new_chain[0] != first.intermediate
        # The running marble renews: a leaf under the new intermediate, same key.
        renewed = marble.renew(c.mesh_addr, root)
        assert renewed.intermediate == new_chain[0]
        assert renewed.leaf.public_key() == first.leaf.public_key()
        steps = [json.loads(x)["update"] for x in c.cli("manifest", "log", *co).stdout.split("\n")
                 if x]  # fmt: skip
        assert steps[-3:] == [
            "Complete manifest update initiated",
            "Complete manifest update acknowledged",
            "Complete manifest updated",
        ]

        # A second proposal can be cancelled by any holder of UpdateManifest.
        c.cli("manifest", "update", "apply", str(path), *co, *bob.args())
        c.cli("manifest", "update", "cancel", *co, *alice.args())
        none = c.cli("manifest", "update", "get", *co, check=False)
        assert none.returncode != 0
        assert "no manifest update is pending" in none.stderr


def test_a_rescheduled_marble_gets_the_same_sealing_key_on_another_machine(
    tmp_path: Path, users: dict[str, UserFiles]
) -> None:
    """Virtual sealing keys: same UUID, another machine (simulated platform), same key."""
    node_b = tmp_path / "node-b-platform"
    Marble(node_b, "web")  # creates node B's simulated platform
    with Cluster(tmp_path) as c:
        c.start_coordinator(extra=("--simulation", "--trust-sim-platform", str(node_b)))
        path = write_manifest(tmp_path / "m.json", manifest(users))
        c.cli("manifest", "set", str(path), *coordinator_args(c))
        root = client.fetch_evidence(
            c.client_addr, accept_simulation=True, platform_dir=c.base / "sim-platform"
        ).root
        on_a = Marble(c.base / "sim-platform", "web")
        first = on_a.activate(c.mesh_addr, root)
        on_b = Marble(node_b, "web")
        on_b.instance = on_a.instance  # the same pod UID / uuid_file, another node
        c.procs[0].stop()  # and the coordinator restarted in between
        c.start_coordinator(
            name="coordinator-2", extra=("--simulation", "--trust-sim-platform", str(node_b))
        )
        second = on_b.activate(c.mesh_addr, root)
        assert second.files["/data.key"] == first.files["/data.key"]
        assert (
            Marble(node_b, "web").activate(c.mesh_addr, root).files["/data.key"]
            != (first.files["/data.key"])
        )
