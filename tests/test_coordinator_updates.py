"""Users, roles and updates in the core: authentication by certificate, package updates,
multi-party manifest updates, the update log, renewal, and shared-store concurrency."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from test_coordinator_env import (
    NOW,
    MemoryStore,
    Person,
    RecoveryHolder,
    World,
    identity,
    package,
    person,
)

from meshproxy.coordinator._admin import NotFound
from meshproxy.coordinator._auth import Owner, Unauthenticated, authenticate
from meshproxy.errors import ManifestError, PolicyError, StateError
from meshproxy.manifest import parse_manifest
from meshproxy.pki import check_peer


def update_manifest(people: dict[str, Person], threshold: int = 0) -> dict[str, Any]:
    return {
        "Packages": {"app": package(2), "other": package(2)},
        "Marbles": {
            "web": {"Package": "app", "MaxActivations": 3},
            "db": {"Package": "other"},
        },
        "Secrets": {
            "cert": {"Type": "cert-ecdsa", "Size": 256, "Shared": True},
            "key": {"Type": "symmetric-key", "Size": 128, "Shared": True},
        },
        "Users": {
            "alice": {"Certificate": people["alice"].pem, "Roles": ["svn-app", "manifest"]},
            "bob": {"Certificate": people["bob"].pem, "Roles": ["manifest"]},
            "carol": {"Certificate": people["carol"].pem, "Roles": ["manifest"]},
            "dave": {"Certificate": people["dave"].pem, "Roles": []},
        },
        "Roles": {
            "svn-app": {
                "ResourceType": "Packages",
                "ResourceNames": ["app"],
                "Actions": ["UpdateSecurityVersion"],
            },
            "manifest": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
        },
        "Config": {"UpdateThreshold": threshold} if threshold else {},
    }


@pytest.fixture
def people() -> dict[str, Person]:
    return {n: person(n) for n in ("alice", "bob", "carol", "dave")}


@pytest.fixture
def world(tmp_path: Path, people: dict[str, Person]) -> World:
    w = World(tmp_path)
    w.set_manifest(update_manifest(people, threshold=2))
    return w


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def log(world: World) -> list[dict[str, Any]]:
    return [json.loads(line) for line in world.admin.update_log()]


# -- authentication ---------------------------------------------------------------------------
def test_users_are_matched_by_key_and_certificate_and_must_be_valid(
    people: dict[str, Person],
) -> None:
    alice = people["alice"]
    manifest = parse_manifest(raw(update_manifest(people)))
    assert authenticate(manifest, alice.der, NOW).name == "alice"
    same_key_other_cert = person("alice", key=alice.key)
    with pytest.raises(Unauthenticated, match="not the certificate of any"):
        authenticate(manifest, same_key_other_cert.der, NOW)
    with pytest.raises(Unauthenticated, match="not the certificate of any"):
        authenticate(manifest, person("mallory").der, NOW)
    with pytest.raises(Unauthenticated, match="needs a user's client certificate"):
        authenticate(manifest, None, NOW)
    with pytest.raises(Unauthenticated, match="does not parse"):
        authenticate(manifest, b"junk", NOW)
    expired = person("old", start=NOW - timedelta(days=10), days=5)
    doc = update_manifest({**people, "dave": expired})
    with pytest.raises(Unauthenticated, match="'dave' is not valid now"):
        authenticate(parse_manifest(raw(doc)), expired.der, NOW)


def test_owner_protects_the_first_manifest(tmp_path: Path, people: dict[str, Person]) -> None:
    owner = people["alice"]
    world = World(tmp_path)
    world.core.owner = Owner(cert_der=owner.der, token_sha256=Owner.token_digest("s3cret-token"))
    doc = raw(update_manifest(people))
    for cert, token in ((None, None), (people["bob"].der, None), (None, "wrong")):
        with pytest.raises(Unauthenticated, match="owner"):
            world.core.initialize(doc, now=NOW, cert_der=cert, token=token)
    world.core.initialize(doc, now=NOW, token="s3cret-token")
    assert "owner" not in repr(world.core.owner) or "s3cret" not in repr(world.core.owner)


# -- package updates --------------------------------------------------------------------------
def test_package_update_raises_the_minimum_and_rotates_the_intermediate(
    world: World, people: dict[str, Person]
) -> None:
    root, inter = world.core.root.cert, world.core.intermediate.cert
    shared = world.core.persistent.shared_secrets
    old_web = world.core.activate(world.request("web"), now=NOW)
    bump = raw({"Packages": {"app": {"SecurityVersion": 3}}})
    with pytest.raises(PolicyError, match=r"'bob' may not UpdateSecurityVersion on 'app'"):
        world.admin.update(people["bob"].der, bump, now=NOW)
    status = world.admin.update(people["alice"].der, bump, now=NOW)
    assert status.applied
    assert status.missing_acks == 0
    assert world.core.root.cert == root
    new_inter = world.core.intermediate.cert
    assert new_inter != inter
    new_inter.verify_directly_issued_by(root)
    after = world.core.persistent.shared_secrets
    assert after["key"] == shared["key"]
    assert after["cert"].cert != shared["cert"].cert
    after["cert"].cert.verify_directly_issued_by(new_inter)  # type: ignore[union-attr]
    # The fingerprint stays (MarbleRun's rule); the running marble's old leaf is outdated.
    first = parse_manifest(world.core.persistent.manifest_raw or b"")
    assert world.core.get_manifest()[1] == first.fingerprint
    with pytest.raises(PolicyError, match="SecurityVersion 2 is below the package's minimum 3"):
        world.core.activate(world.request("web"), now=NOW)
    world.core.activate(world.request("web", identity(svn=3)), now=NOW)
    world.core.activate(world.request("db"), now=NOW)  # the other package is unchanged
    leaf = x509.load_pem_x509_certificate(old_web.leaf_pem)
    with pytest.raises(InvalidSignature):
        leaf.verify_directly_issued_by(new_inter)
    entry = log(world)[-1]
    assert entry["update"] == "SecurityVersion increased"
    assert (entry["user"], entry["package"], entry["new version"]) == ("alice", "app", 3)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"Packages": {"app": {"SecurityVersion": 1}}}, "may not decrease"),
        ({"Packages": {"app": {"SecurityVersion": 3, "ProductID": 2}}}, "only SecurityVersion"),
        ({"Packages": {"ghost": {"SecurityVersion": 3}}}, "no package named 'ghost'"),
        ({"Packages": {"app": {}}}, "missing SecurityVersion"),
    ],
)
def test_bad_package_updates_are_refused(
    world: World, people: dict[str, Person], doc: dict[str, Any], message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        world.admin.update(people["alice"].der, raw(doc), now=NOW)


# -- full updates -----------------------------------------------------------------------------
def test_full_update_applies_at_the_threshold_and_logs_each_step(
    world: World, people: dict[str, Person]
) -> None:
    alice, bob, dave = people["alice"], people["bob"], people["dave"]
    root = world.core.root.cert
    new_doc = update_manifest(people, threshold=2)
    new_doc["Marbles"]["api"] = {"Package": "app"}
    new_raw = raw(new_doc)
    with pytest.raises(PolicyError, match="'dave' does not hold UpdateManifest"):
        world.admin.update(dave.der, new_raw, now=NOW)
    with pytest.raises(NotFound):
        world.admin.pending()
    status = world.admin.update(alice.der, new_raw, now=NOW)
    assert not status.applied
    assert (status.missing_acks, status.missing_users) == (1, ("bob", "carol"))
    assert world.admin.pending() == (new_raw, 1, ("bob", "carol"))
    with pytest.raises(StateError, match="pending"):
        world.admin.update(bob.der, new_raw, now=NOW)
    with pytest.raises(PolicyError, match="already acknowledged"):
        world.admin.acknowledge(alice.der, new_raw, now=NOW)
    with pytest.raises(PolicyError, match="differs from the pending update"):
        world.admin.acknowledge(bob.der, new_raw + b" ", now=NOW)
    with pytest.raises(PolicyError, match="unknown marble type 'api'"):
        world.core.activate(world.request("api"), now=NOW)
    done = world.admin.acknowledge(bob.der, new_raw, now=NOW)
    assert done.applied
    assert done.recovery_secrets == {}
    world.core.activate(world.request("api"), now=NOW)
    assert world.core.get_manifest()[0] == new_raw
    assert world.core.root.cert == root
    steps = [e["update"] for e in log(world)]
    assert steps[-3:] == [
        "Complete manifest update initiated",
        "Complete manifest update acknowledged",
        "Complete manifest updated",
    ]


def test_cancel_and_recovery_keys_change(world: World, people: dict[str, Person]) -> None:
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    doc = update_manifest(people, threshold=2)
    world.admin.update(alice.der, raw(doc), now=NOW)
    with pytest.raises(PolicyError, match="does not hold UpdateManifest"):
        world.admin.cancel(people["dave"].der, now=NOW)
    world.admin.cancel(carol.der, now=NOW)
    with pytest.raises(NotFound):
        world.admin.cancel(carol.der, now=NOW)
    assert log(world)[-1]["update"] == "Complete manifest update cancelled"
    holder = RecoveryHolder("ops")
    doc["RecoveryKeys"] = {"ops": holder.public_pem}
    dek = world.core.persistent.dek
    world.admin.update(alice.der, raw(doc), now=NOW)
    status = world.admin.acknowledge(bob.der, raw(doc), now=NOW)
    assert list(status.recovery_secrets) == ["ops"]
    assert world.core.persistent.dek != dek


# -- renewal ----------------------------------------------------------------------------------
def test_renewal_is_attested_and_refused_when_the_marble_no_longer_fits(
    world: World, people: dict[str, Person]
) -> None:
    instance = "9d5b2b8a-54d6-4f55-b6b3-5c4a45a6e0a1"
    with pytest.raises(PolicyError, match="never activated"):
        world.core.renew(world.request("web", instance=instance), now=NOW)
    world.core.activate(world.request("web", instance=instance), now=NOW)
    later = NOW + timedelta(hours=20)
    renewed = world.core.renew(world.request("web", instance=instance, now=later), now=later)
    leaf = x509.load_pem_x509_certificate(renewed.leaf_pem)
    leaf.verify_directly_issued_by(world.core.intermediate.cert)
    assert check_peer(leaf, trust_domain="meshproxy.local", allowed_types=["web"]).uuid == instance
    for _ in range(3):  # renewals do not count against MaxActivations (3)
        world.core.renew(world.request("web", instance=instance), now=NOW)
    world.core.activate(world.request("web"), now=NOW)
    world.core.activate(world.request("web"), now=NOW)
    assert world.core.activation_counts() == {"web": 3}
    bump = raw({"Packages": {"app": {"SecurityVersion": 3}}})
    world.admin.update(people["alice"].der, bump, now=NOW)
    with pytest.raises(PolicyError, match="below the package's minimum 3"):
        world.core.renew(world.request("web", instance=instance), now=NOW)
    after = world.core.renew(world.request("web", identity(svn=3), instance=instance), now=NOW)
    x509.load_pem_x509_certificate(after.leaf_pem).verify_directly_issued_by(
        world.core.intermediate.cert
    )


# -- replicas on one store ----------------------------------------------------------------------
def test_two_cores_on_one_store_never_exceed_max_activations(
    tmp_path: Path, people: dict[str, Person]
) -> None:
    store = MemoryStore()
    a = World(tmp_path, store=store)
    a.set_manifest(update_manifest(people))
    b = World(tmp_path, store=store)  # same machine: opens the state with its own key
    assert b.core.manifest is not None
    # b's commit races with a's: b's compare-and-swap fails and it recomputes on a's state.
    racing = a.request("web")
    store.before_save = lambda: a.core.activate(racing, now=NOW)
    b.core.activate(b.request("web"), now=NOW)
    assert store.conflicts == 1
    a.core.activate(a.request("web"), now=NOW)
    with pytest.raises(PolicyError, match="MaxActivations"):
        b.core.activate(b.request("web"), now=NOW)
    assert a.core.activation_counts() == b.core.activation_counts() == {"web": 3}
    # An update through one replica is what the other serves next.
    bump = raw({"Packages": {"app": {"SecurityVersion": 3}}})
    a.admin.update(people["alice"].der, bump, now=NOW)
    assert b.core.persistent.package_svn == {}
    b.core.sync()
    assert b.core.persistent.package_svn == {"app": 3}
    assert b.core.intermediate.cert == a.core.intermediate.cert
