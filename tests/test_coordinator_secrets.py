"""Secrets end to end in the core: every type, shared and per marble, ValidFor and Cert
templates, every template function, user-defined values read and written by users with
roles, ``.Previous.Secrets`` after RotateRootSecret, and virtual sealing keys."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from test_coordinator_env import NOW, Person, World, package, person

from meshproxy.attestation import SimulationPlatform
from meshproxy.coordinator._admin import NotFound
from meshproxy.coordinator._auth import Unauthenticated
from meshproxy.coordinator._usersecrets import BadUpload
from meshproxy.errors import PolicyError

FILES = {
    "/sym.hex": "{{ hex .Secrets.own }}",
    "/sym.raw": "{{ raw .Secrets.own }}",
    "/shared.b64": "{{ base64 .Secrets.shared }}",
    "/ecdsa.crt": "{{ pem .Secrets.ecdsa.Cert }}",
    "/ecdsa.key": "{{ pem .Secrets.ecdsa.Private }}",
    "/ecdsa.pub": "{{ pem .Secrets.ecdsa.Public }}",
    "/rsa.der": "{{ raw .Secrets.rsa.Cert }}",
    "/rsa.key.der": "{{ raw .Secrets.rsa.Private }}",
    "/ed.crt": "{{ pem .Secrets.ed.Cert }}",
    "/ed.pub.hex": "{{ hex .Secrets.ed.Public }}",
    "/user.key": "{{ raw .Secrets.userkey }}",
    "/user.crt": "{{ pem .Secrets.usercert.Cert }}",
    "/prev.hex": "{{ hex .Previous.Secrets.own }}",
    "/prevshared.hex": "{{ hex .Previous.Secrets.shared }}",
    "/root.crt": "{{ pem .MarbleRun.CoordinatorRoot.Cert }}",
    "/marble.crt": "{{ pem .MarbleRun.MarbleCert.Cert }}",
    "/literal": {"Data": "{{ not a template }}", "NoTemplates": True},
}
ENV = {
    "PLAIN": "{{ string .Secrets.plain }}",
    "SYM_B64": "{{ base64 .Secrets.own }}",
    "ECDSA_PEM": "{{ pem .Secrets.ecdsa.Cert }}",
}


def secrets_manifest(alice: Person, bob: Person, **config: Any) -> dict[str, Any]:
    return {
        "Packages": {"app": package()},
        "Marbles": {
            "full": {"Package": "app", "Parameters": {"Files": FILES, "Env": ENV}},
            "plain": {"Package": "app", "Parameters": {"Files": {"/k": "{{ hex .Secrets.own }}"}}},
        },
        "Secrets": {
            "own": {"Type": "symmetric-key", "Size": 128},
            "shared": {"Type": "symmetric-key", "Size": 256, "Shared": True},
            "ecdsa": {
                "Type": "cert-ecdsa",
                "Size": 384,
                "Shared": True,
                "ValidFor": 7,
                "Cert": {
                    "Subject": {"CommonName": "db.test", "Organization": ["Org"]},
                    "DNSNames": ["db.test", "db"],
                    "IPAddresses": ["10.0.0.1"],
                },
            },
            "rsa": {"Type": "cert-rsa", "Size": 2048},
            "ed": {
                "Type": "cert-ed25519",
                "Shared": True,
                "Cert": {"NotAfter": "2030-01-01T00:00:00Z"},
            },
            "plain": {"Type": "plain", "UserDefined": True},
            "userkey": {"Type": "symmetric-key", "Size": 128, "UserDefined": True},
            "usercert": {"Type": "cert-ecdsa", "Size": 256, "UserDefined": True},
        },
        "Users": {
            "alice": {"Certificate": alice.pem, "Roles": ["reader", "writer"]},
            "bob": {"Certificate": bob.pem, "Roles": ["plainwriter"]},
        },
        "Roles": {
            "reader": {
                "ResourceType": "Secrets",
                "ResourceNames": ["shared", "ecdsa", "userkey", "usercert", "plain"],
                "Actions": ["ReadSecret"],
            },
            "writer": {
                "ResourceType": "Secrets",
                "ResourceNames": ["userkey", "usercert", "plain"],
                "Actions": ["WriteSecret"],
            },
            "plainwriter": {
                "ResourceType": "Secrets",
                "ResourceNames": ["plain"],
                "Actions": ["writesecret"],
            },
        },
        **({"Config": config} if config else {}),
    }


@pytest.fixture
def people() -> tuple[Person, Person]:
    return person("alice"), person("bob")


@pytest.fixture
def world(tmp_path: Path, people: tuple[Person, Person]) -> World:
    w = World(tmp_path)
    w.set_manifest(secrets_manifest(*people))
    return w


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def user_cert_upload() -> tuple[dict[str, str], x509.Certificate]:
    p = person("uploaded")
    der_key = p.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {"Cert": b64(p.der), "Private": b64(der_key)}, p.cert


def upload_all(world: World, alice: Person) -> x509.Certificate:
    cert_upload, cert = user_cert_upload()
    world.admin.set_secrets(
        alice.der,
        {
            "plain": {"Key": b64(b"hello plain")},
            "userkey": {"key": b64(bytes(range(16)))},  # keys match case-insensitively
            "usercert": cert_upload,
        },
        now=NOW,
    )
    return cert


def test_marble_using_unset_user_secrets_is_refused_until_they_are_set(
    world: World, people: tuple[Person, Person]
) -> None:
    with pytest.raises(PolicyError, match=r"'plain', 'userkey', 'usercert' that no user has set"):
        world.core.activate(world.request("full"), now=NOW)
    world.core.activate(world.request("plain"), now=NOW)  # uses none of them
    upload_all(world, people[0])
    world.core.activate(world.request("full"), now=NOW)


def test_every_type_and_template_function(world: World, people: tuple[Person, Person]) -> None:
    user_cert = upload_all(world, people[0])
    result = world.core.activate(world.request("full"), now=NOW)
    files, env = result.parameters.files, result.parameters.env
    inter = world.core.intermediate.cert

    own = bytes.fromhex(files["/sym.hex"].decode())
    assert len(own) == 16
    assert files["/sym.raw"] == own
    assert base64.b64decode(env["SYM_B64"]) == own
    assert len(base64.b64decode(files["/shared.b64"])) == 32

    ecdsa = x509.load_pem_x509_certificate(files["/ecdsa.crt"])
    ecdsa.verify_directly_issued_by(inter)
    assert ecdsa.not_valid_after_utc == ecdsa.not_valid_before_utc + timedelta(days=7, minutes=5)
    assert ecdsa.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "db.test"
    assert ecdsa.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Org"
    san = ecdsa.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.test", "db"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    key = serialization.load_pem_private_key(files["/ecdsa.key"], None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.key_size == 384
    assert key.public_key() == serialization.load_pem_public_key(files["/ecdsa.pub"])
    assert env["ECDSA_PEM"] == files["/ecdsa.crt"]

    rsa_cert = x509.load_der_x509_certificate(files["/rsa.der"])
    rsa_key = serialization.load_der_private_key(files["/rsa.key.der"], None)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert rsa_key.key_size == 2048
    assert rsa_cert.public_key() == rsa_key.public_key()
    assert rsa_cert.not_valid_after_utc - rsa_cert.not_valid_before_utc > timedelta(days=364)

    ed = x509.load_pem_x509_certificate(files["/ed.crt"])
    assert isinstance(ed.public_key(), ed25519.Ed25519PublicKey)
    assert ed.not_valid_after_utc.year == 2030

    assert env["PLAIN"] == b"hello plain"
    assert files["/user.key"] == bytes(range(16))
    assert x509.load_pem_x509_certificate(files["/user.crt"]) == user_cert
    # Never rotated: the previous secrets are the current ones.
    assert files["/prev.hex"] == files["/sym.hex"]
    assert x509.load_pem_x509_certificate(files["/root.crt"]) == world.core.root.cert
    assert files["/marble.crt"] == result.leaf_pem
    assert files["/literal"] == b"{{ not a template }}"


def test_shared_secrets_are_common_and_unique_ones_per_instance(world: World) -> None:
    a = world.core.activate(world.request("plain"), now=NOW).parameters.files["/k"]
    instance = str(uuid.uuid4())
    b = world.core.activate(world.request("plain", instance=instance), now=NOW)
    c = world.core.activate(world.request("plain", instance=instance), now=NOW)
    assert a != b.parameters.files["/k"]
    assert b.parameters.files == c.parameters.files


def test_virtual_sealing_key_survives_rescheduling_to_another_machine(
    tmp_path: Path, people: tuple[Person, Person]
) -> None:
    """A marble's derived key depends on its UUID, type and the cluster's root secret only:
    the same UUID on another machine (another simulated platform), and after the
    coordinator restarts, gets the same key."""
    node_b = SimulationPlatform.load_or_create(tmp_path / "node-b", now=NOW)
    world = World(tmp_path)
    world.extra_anchors.append(node_b)
    world.boot()
    world.set_manifest(secrets_manifest(*people))
    instance = str(uuid.uuid4())
    on_a = world.core.activate(world.request("plain", instance=instance), now=NOW)
    restarted = World(tmp_path, store=world.store)
    restarted.extra_anchors.append(node_b)
    restarted.boot()
    on_b = restarted.core.activate(
        restarted.request("plain", instance=instance, platform=node_b), now=NOW
    )
    assert on_a.parameters.files["/k"] == on_b.parameters.files["/k"]
    other = restarted.core.activate(restarted.request("plain", platform=node_b), now=NOW)
    assert other.parameters.files["/k"] != on_a.parameters.files["/k"]


def test_users_read_what_their_roles_allow_in_marbleruns_shape(
    world: World, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    user_cert = upload_all(world, alice)
    got = world.admin.get_secrets(alice.der, ["shared", "usercert", "plain"], now=NOW)
    assert got["shared"]["Type"] == "symmetric-key"
    assert got["shared"]["Shared"] is True
    assert len(base64.b64decode(got["shared"]["Public"])) == 32
    assert got["shared"]["Cert"] is None
    assert base64.b64decode(got["usercert"]["Cert"]) == user_cert.public_bytes(
        serialization.Encoding.DER
    )
    assert got["usercert"]["UserDefined"] is True
    assert got["usercert"]["Private"]
    assert base64.b64decode(got["plain"]["Private"]) == b"hello plain"
    ecdsa = world.admin.get_secrets(alice.der, ["ecdsa"], now=NOW)["ecdsa"]
    assert ecdsa["ValidFor"] == 7
    assert ecdsa["Size"] == 384
    with pytest.raises(PolicyError, match=r"user 'bob' may not ReadSecret on 'shared'"):
        world.admin.get_secrets(bob.der, ["shared"], now=NOW)
    with pytest.raises(PolicyError, match=r"may not ReadSecret on 'own'"):
        world.admin.get_secrets(alice.der, ["shared", "own"], now=NOW)
    with pytest.raises(Unauthenticated, match="client certificate"):
        world.admin.get_secrets(None, ["shared"], now=NOW)


def test_unset_secret_reads_as_not_found(world: World, people: tuple[Person, Person]) -> None:
    with pytest.raises(NotFound, match="'userkey' has not been set"):
        world.admin.get_secrets(people[0].der, ["userkey"], now=NOW)


def test_writes_are_role_checked_logged_and_validated(
    world: World, people: tuple[Person, Person]
) -> None:
    alice, bob = people
    world.admin.set_secrets(bob.der, {"plain": {"Key": b64(b"from bob")}}, now=NOW)
    with pytest.raises(PolicyError, match=r"may not WriteSecret on 'userkey'"):
        world.admin.set_secrets(bob.der, {"userkey": {"Key": b64(b"x" * 16)}}, now=NOW)
    log = [json.loads(line) for line in world.admin.update_log()]
    assert log[-1] == {
        "time": log[-1]["time"],
        "update": "Secret set",
        "user": "bob",
        "secret": "plain",
        "type": "plain",
    }
    assert "from bob" not in json.dumps(log)
    ecdsa_256 = person("x")
    wrong_curve = person("y", key=ec.generate_private_key(ec.SECP384R1()))
    other_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    bad: list[tuple[str, dict[str, Any], str]] = [
        ("userkey", {"Key": b64(b"short")}, "has 40 bits, the manifest says Size 128"),
        ("userkey", {"Cert": b64(ecdsa_256.der)}, "takes Key"),
        ("usercert", {"Key": b64(b"x")}, "takes Cert"),
        ("usercert", {"Cert": b64(wrong_curve.der)}, "curve has 384 bits"),
        ("usercert", {"Cert": b64(ecdsa_256.der), "Private": b64(other_key)}, "does not belong"),
        ("usercert", {"Cert": "%%%"}, "not valid base64"),
        ("usercert", {"Cert": b64(b"junk")}, "not a DER X.509"),
        ("plain", {"Key": b64(b"nul\x00in env")}, "NUL"),
        ("plain", {"Value": b64(b"x")}, "unknown field 'Value'"),
    ]
    for name, body, message in bad:
        with pytest.raises(BadUpload, match=message):
            world.admin.set_secrets(alice.der, {name: body}, now=NOW)
    with pytest.raises(PolicyError, match="no secret named 'ghost'"):
        world.admin.set_secrets(alice.der, {"ghost": {"Key": b64(b"x")}}, now=NOW)


def test_rotate_root_secret_keeps_the_previous_values(
    tmp_path: Path, people: tuple[Person, Person]
) -> None:
    alice = people[0]
    doc = secrets_manifest(*people)
    doc["Users"]["alice"]["Roles"].append("updater")
    doc["Roles"]["updater"] = {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]}
    world = World(tmp_path)
    world.set_manifest(doc)
    upload_all(world, alice)
    instance = str(uuid.uuid4())
    before = world.core.activate(world.request("full", instance=instance), now=NOW)
    rotated = json.loads(json.dumps(doc))
    rotated["Config"] = {"RotateRootSecret": True}
    status = world.admin.update(alice.der, json.dumps(rotated).encode(), now=NOW)
    assert status.applied
    after = world.core.activate(world.request("full", instance=instance), now=NOW)
    fb, fa = before.parameters.files, after.parameters.files
    assert fa["/sym.hex"] != fb["/sym.hex"]
    assert fa["/prev.hex"] == fb["/sym.hex"]
    assert fa["/shared.b64"] != fb["/shared.b64"]
    assert bytes.fromhex(fa["/prevshared.hex"].decode()) == base64.b64decode(fb["/shared.b64"])
    assert fa["/user.key"] == fb["/user.key"]  # user-defined values survive the update
