"""Owner, users, roles and secrets through the real CLI against a real coordinator."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from integration.harness import Cluster
from integration.test_lifecycle_env import (
    UserFiles,
    coordinator_args,
    make_user,
    package,
    write_manifest,
)


def manifest(alice: UserFiles, bob: UserFiles) -> dict[str, object]:
    return {
        "Packages": {"app": package()},
        "Marbles": {
            "app": {
                "Package": "app",
                "Parameters": {
                    "Env": {"API_TOKEN": "{{ string .Secrets.token }}"},
                    "Files": {"/tls/cert.pem": "{{ pem .Secrets.tls.Cert }}"},
                },
            }
        },
        "Secrets": {
            "token": {"Type": "plain", "UserDefined": True},
            "aes": {"Type": "symmetric-key", "Size": 128, "UserDefined": True},
            "tls": {"Type": "cert-ecdsa", "Size": 256, "UserDefined": True},
            "shared": {"Type": "symmetric-key", "Size": 256, "Shared": True},
        },
        "Users": {
            "alice": {"Certificate": alice.pem, "Roles": ["writer", "reader"]},
            "bob": {"Certificate": bob.pem, "Roles": ["reader"]},
        },
        "Roles": {
            "writer": {
                "ResourceType": "Secrets",
                "ResourceNames": ["token", "aes", "tls"],
                "Actions": ["WriteSecret"],
            },
            "reader": {
                "ResourceType": "Secrets",
                "ResourceNames": ["token", "shared"],
                "Actions": ["ReadSecret"],
            },
        },
    }


def test_owner_token_protects_the_first_manifest(tmp_path: Path) -> None:
    token = tmp_path / "owner.token"
    token.write_text("0f1e2d3c4b5a69788796a5b4c3d2e1f0\n")
    token.chmod(0o600)
    with Cluster(tmp_path) as c:
        c.start_coordinator(extra=("--simulation", "--owner-token-file", str(token)))
        alice, bob = make_user(tmp_path / "users", "alice"), make_user(tmp_path / "users", "bob")
        path = write_manifest(tmp_path / "m.json", manifest(alice, bob))
        anyone = c.cli("manifest", "set", str(path), *coordinator_args(c), check=False)
        assert anyone.returncode != 0
        assert "only accepts its first manifest from its owner" in anyone.stderr
        assert "Traceback" not in anyone.stderr
        wrong = c.cli(
            "manifest", "set", str(path), *coordinator_args(c), "--owner-token", "guess",
            check=False,
        )  # fmt: skip
        assert wrong.returncode != 0
        c.cli("manifest", "set", str(path), *coordinator_args(c), "--owner-token-file", str(token))
        status = c.cli("status", *coordinator_args(c))
        assert status.stdout.startswith("3: ")
        logged = (c.logs / "coordinator.log").read_text()
        assert "0f1e2d3c4b5a6978" not in logged


def test_owner_certificate_protects_the_first_manifest(tmp_path: Path) -> None:
    owner = make_user(tmp_path / "users", "owner")
    with Cluster(tmp_path) as c:
        c.start_coordinator(extra=("--simulation", "--owner-cert", str(owner.cert)))
        stranger = make_user(tmp_path / "users", "stranger")
        path = write_manifest(tmp_path / "m.json", manifest(owner, stranger))
        refused = c.cli(
            "manifest", "set", str(path), *coordinator_args(c), *stranger.args(), check=False
        )
        assert refused.returncode != 0
        assert "refused the client certificate" in refused.stderr
        c.cli("manifest", "set", str(path), *coordinator_args(c), *owner.args())


def test_users_write_and_read_secrets_as_their_roles_allow(tmp_path: Path) -> None:
    users = tmp_path / "users"
    alice, bob, eve = (make_user(users, n) for n in ("alice", "bob", "eve"))
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        path = write_manifest(tmp_path / "m.json", manifest(alice, bob))
        c.cli("manifest", "set", str(path), *coordinator_args(c))
        co = coordinator_args(c)

        c.cli("secret", "set", "token", "--value", "s3cr3t-api-token", *co, *alice.args())
        key_file = tmp_path / "aes.bin"
        key_file.write_bytes(bytes(range(16)))
        c.cli("secret", "set", "aes", "--from-file", str(key_file), *co, *alice.args())
        tls = make_user(tmp_path / "tls", "tls-server")  # a cert + key pair, PEM
        bundle = tmp_path / "tls-bundle.pem"
        bundle.write_bytes(tls.cert.read_bytes() + tls.key.read_bytes())
        c.cli("secret", "set", "tls", "--from-file", str(bundle), *co, *alice.args())

        got = c.cli("secret", "get", "token", "shared", *co, *bob.args())
        secrets = json.loads(got.stdout)
        assert base64.b64decode(secrets["token"]["Public"]) == b"s3cr3t-api-token"
        assert secrets["shared"]["Type"] == "symmetric-key"
        assert len(base64.b64decode(secrets["shared"]["Private"])) == 32

        denied = c.cli("secret", "get", "aes", *co, *bob.args(), check=False)
        assert denied.returncode != 0
        assert "user 'bob' may not ReadSecret on 'aes'" in denied.stderr
        denied = c.cli("secret", "set", "token", "--value", "x", *co, *bob.args(), check=False)
        assert "user 'bob' may not WriteSecret on 'token'" in denied.stderr
        foreign = c.cli("secret", "get", "token", *co, *eve.args(), check=False)
        assert foreign.returncode != 0
        assert "refused the client certificate" in foreign.stderr
        anonymous = c.cli("secret", "get", "token", *co, "--cert", str(eve.cert), check=False)
        assert anonymous.returncode == 2  # --key missing: a usage error
        bad_size = tmp_path / "short.bin"
        bad_size.write_bytes(b"short")
        wrong = c.cli("secret", "set", "aes", "--from-file", str(bad_size), *co, *alice.args(),
                      check=False)  # fmt: skip
        assert "has 40 bits, the manifest says Size 128" in wrong.stderr
        for res in (denied, foreign, wrong):
            assert "Traceback" not in res.stderr

        tls_denied = c.cli("secret", "get", "tls", *co, *alice.args(), check=False)
        assert "may not ReadSecret on 'tls'" in tls_denied.stderr

        log = [json.loads(line) for line in c.cli("manifest", "log", *co).stdout.splitlines()]
        assert [e["update"] for e in log] == ["Initial manifest set"] + ["Secret set"] * 3
        assert [e["secret"] for e in log[1:]] == ["token", "aes", "tls"]
        assert all(e["user"] == "alice" for e in log[1:])
        coordinator_log = (c.logs / "coordinator.log").read_text()
        assert "s3cr3t-api-token" not in coordinator_log
        assert "PRIVATE KEY" not in coordinator_log


def test_secret_files_from_get_are_usable(tmp_path: Path) -> None:
    users = tmp_path / "users"
    alice, bob = make_user(users, "alice"), make_user(users, "bob")
    doc = manifest(alice, bob)
    doc["Roles"]["reader"]["ResourceNames"] = ["token", "shared", "tls"]  # type: ignore[index]
    with Cluster(tmp_path) as c:
        c.start_coordinator()
        c.cli(
            "manifest", "set", str(write_manifest(tmp_path / "m.json", doc)), *coordinator_args(c)
        )
        co = coordinator_args(c)
        tls = make_user(tmp_path / "tls", "tls-server")
        bundle = tmp_path / "bundle.pem"
        bundle.write_bytes(tls.cert.read_bytes() + tls.key.read_bytes())
        c.cli("secret", "set", "tls", "--from-file", str(bundle), *co, *alice.args())
        c.cli("secret", "set", "token", "--value", "tok", *co, *alice.args())
        out = tmp_path / "out"
        c.cli("secret", "get", "tls", "token", "shared", *co, *bob.args(), "-o", str(out))
        assert x509.load_pem_x509_certificate((out / "tls.crt").read_bytes()) == (
            x509.load_pem_x509_certificate(tls.cert.read_bytes())
        )
        key = serialization.load_pem_private_key((out / "tls.key").read_bytes(), None)
        assert (
            key.public_key() == x509.load_pem_x509_certificate(tls.cert.read_bytes()).public_key()
        )
        assert (out / "tls.key").stat().st_mode & 0o777 == 0o600
        assert (out / "token").read_bytes() == b"tok"
        assert len((out / "shared").read_bytes()) == 32
