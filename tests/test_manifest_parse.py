"""Manifest parsing: every rule refuses with the file and key path, and valid ones load."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshproxy.errors import ManifestError
from meshproxy.manifest import Manifest, parse_manifest

DATA = Path(__file__).parent / "data" / "manifests"
UNIQUE_ID = "6b2822ac2585040d4b9397675d54977a71ef292ab5b3c0a6acceca26074ae585"
SIGNER_ID = "43361affedeb75affee9baec7e054a5e14883213e5a121b67d74a0e12e9d2b7a"


def full() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / "full.json").read_bytes())
    return doc


def minimal() -> dict[str, Any]:
    return {
        "Packages": {"backend": {"UniqueID": UNIQUE_ID}},
        "Marbles": {"backend": {"Package": "backend"}},
    }


def load(doc: dict[str, Any], source: str = "manifest.json") -> Manifest:
    return parse_manifest(json.dumps(doc).encode(), source)


def refused(doc: dict[str, Any] | bytes, *fragments: str) -> str:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw, "manifest.json")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    return message


# -- fixtures and formats ----------------------------------------------------------------
def test_full_fixture_loads_every_feature() -> None:
    raw = (DATA / "full.json").read_bytes()
    m = parse_manifest(raw, "full.json")
    assert m.raw == raw
    assert m.packages["backend"].unique_id == bytes.fromhex(UNIQUE_ID)
    assert m.packages["frontend"].signer_id == bytes.fromhex(SIGNER_ID)
    assert (m.packages["frontend"].product_id, m.packages["frontend"].security_version) == (43, 3)
    assert m.packages["backend"].accepted_advisories == ("INTEL-SA-00334", "INTEL-SA-00615")
    assert m.packages["tools"].debug
    backend = m.marbles["backendFirst"]
    assert backend.max_activations == 1
    assert backend.tls == ("backendFirstTLS",)
    assert backend.parameters.argv == ("./backend", "--first", "serve")
    assert backend.parameters.files["/tmp/pqr.ust"].data == b"foo\nbar"
    assert backend.parameters.files["/tmp/pqr.ust"].no_templates
    assert backend.parameters.files["/tmp/raw.bin"].data == b"\x00\xff{{"
    assert backend.parameters.env["LITERAL"].data == b"{{ not a template }}"
    assert m.marbles["frontend"].disable_secret_binding
    assert m.secrets["rsaCert"].valid_for_days == 7
    assert m.secrets["rsaCert"].cert.common_name == "MarbleRun Unit Test"
    ecdsa = m.secrets["ecdsaCert"]
    assert ecdsa.valid_for_days is None
    assert ecdsa.cert.not_after is not None
    assert ecdsa.cert.not_after.year == 2030
    assert ecdsa.cert.ip_addresses == ("10.0.0.1", "::1")
    assert ecdsa.cert.organization == ("Example Org",)
    assert m.secrets["ed25519Cert"].valid_for_days == 365
    assert m.secrets["genericSecret"].user_defined
    alice = x509.load_pem_x509_certificate(m.users["alice"].certificate_pem)
    assert alice.subject.rfc4514_string() == "CN=alice"
    assert m.users["alice"].roles == ("secretManager", "updateFrontend")
    assert m.roles["secretManager"].actions == ("readsecret", "writesecret")
    key = serialization.load_pem_public_key(m.recovery_keys["recoveryKey1"])
    assert isinstance(key, rsa.RSAPublicKey)
    incoming = m.tls["backendFirstTLS"].incoming
    assert incoming[1].cert == "rsaCert"
    assert incoming[1].disable_client_auth
    assert m.config.feature_gates == ("MonotonicCounter",)
    assert m.config.update_threshold == 1
    assert m.mesh.trust_domain == "demo.meshproxy.local"
    assert m.mesh.certificate_lifetime == 12 * 3600
    assert m.mesh.callers_of("backendFirst") == ("frontend",)


def test_yaml_fixture_loads() -> None:
    m = parse_manifest((DATA / "mesh.yaml").read_bytes(), "mesh.yaml")
    assert m.packages["store"].signer_id == bytes.fromhex(SIGNER_ID)
    assert m.packages["web"].unique_id == bytes.fromhex(UNIQUE_ID)
    assert m.marbles["web"].parameters.env["GREETING"].data == b"hello"
    assert m.marbles["store"].parameters.argv == ("store", "--listen", "unix:/run/store.sock")
    assert m.secrets["storeCert"].cert.not_after is not None
    assert m.mesh.callers_of("store") == ("web",)
    assert m.mesh.certificate_lifetime == 6 * 3600


def test_json_and_yaml_give_the_same_model() -> None:
    doc = minimal()
    yaml_text = b"Packages:\n  backend: {UniqueID: " + UNIQUE_ID.encode() + b"}\n"
    yaml_text += b"Marbles:\n  backend:\n    Package: backend\n"
    from_json, from_yaml = load(doc), parse_manifest(yaml_text, "m.yaml")
    assert from_json.packages == from_yaml.packages
    assert from_json.marbles == from_yaml.marbles


def test_fingerprint_is_sha256_of_the_exact_bytes() -> None:
    raw = json.dumps(minimal()).encode()
    spaced = json.dumps(minimal(), indent=4).encode()
    a, b = parse_manifest(raw), parse_manifest(spaced)
    assert a.fingerprint == hashlib.sha256(raw).hexdigest()
    assert b.fingerprint == hashlib.sha256(spaced).hexdigest()
    assert a.fingerprint != b.fingerprint
    assert a.raw == raw


def test_model_is_immutable() -> None:
    m = load(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.config = m.config  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.marbles["x"] = m.marbles["backend"]  # type: ignore[index]


# -- generic strictness -----------------------------------------------------------------
def test_unknown_key_names_path_and_suggests() -> None:
    doc = minimal()
    doc["Marbles"]["backend"] = {"Pakage": "backend"}
    message = refused(doc)
    assert (
        message == "manifest.json: Marbles.backend: unknown key 'Pakage' (did you mean 'Package'?)"
    )


def test_unknown_top_level_key_suggests() -> None:
    doc = minimal()
    doc["Secret"] = {}
    refused(doc, "manifest.json: unknown key 'Secret' (did you mean 'Secrets'?)")


def test_keys_match_case_insensitively_like_go() -> None:
    doc = {
        "packages": {"backend": {"uniqueid": UNIQUE_ID, "DEBUG": False}},
        "MARBLES": {"backend": {"package": "backend", "maxactivations": 2}},
    }
    m = load(doc)
    assert m.marbles["backend"].max_activations == 2


def test_same_key_in_two_spellings_is_refused() -> None:
    doc = minimal()
    doc["Marbles"]["backend"]["package"] = "backend"
    refused(doc, "Marbles.backend", "given twice")


def test_names_are_case_sensitive() -> None:
    doc = minimal()
    doc["Marbles"]["backend"]["Package"] = "Backend"
    refused(doc, "Marbles.backend.Package: no package named 'Backend' (did you mean 'backend'?)")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"Packages": {}, "Packages": {}}',
        b"Packages: {}\nPackages: {}\n",
    ],
    ids=["json", "yaml"],
)
def test_duplicate_keys_are_refused(raw: bytes) -> None:
    refused(raw, "manifest.json", "duplicate key 'Packages'")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"[1, 2]", "expected a mapping"),
        (b'{"Packages": ', "line 1"),
        (b"\xff\xfe", "not UTF-8"),
        (b"a: 2020-02-31\n", "not a valid document"),
        (b"? [1]\n: 2\n", "manifest.json"),
    ],
)
def test_malformed_documents(raw: bytes, fragment: str) -> None:
    refused(raw, "manifest.json", fragment)


@pytest.mark.parametrize(
    ("section", "fragment"),
    [("Packages", "'Packages'"), ("Marbles", "'Marbles'")],
)
def test_packages_and_marbles_are_required(section: str, fragment: str) -> None:
    doc = minimal()
    del doc[section]
    refused(doc, "manifest.json: missing required key", fragment)
    doc[section] = {}
    refused(doc, f"manifest.json: {section}: at least one")


# -- rules, table-driven ------------------------------------------------------------------
Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = doc
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[int(key)]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()
M = "Marbles/backendFirst"
P = "Marbles/backendFirst/Parameters"

RULES: list[tuple[str, Mutation, tuple[str, ...]]] = [
    # Packages
    (
        "uniqueid-not-hex",
        _set("Packages/backend/UniqueID", "zz" * 32),
        ("Packages.backend.UniqueID: invalid hex",),
    ),
    (
        "uniqueid-length",
        _set("Packages/backend/UniqueID", "abcd"),
        ("Packages.backend.UniqueID: must be 64 hex",),
    ),
    ("signerid-length", _set("Packages/frontend/SignerID", "ab"), ("Packages.frontend.SignerID",)),
    (
        "unique-and-signer",
        _set("Packages/backend/SignerID", SIGNER_ID),
        ("Packages.backend: give either UniqueID",),
    ),
    (
        "missing-productid",
        _set("Packages/frontend/ProductID", _DELETE),
        ("Packages.frontend: missing ProductID", "Marbles.frontend"),
    ),
    (
        "missing-svn",
        _set("Packages/frontend/SecurityVersion", None),
        ("Packages.frontend: missing SecurityVersion",),
    ),
    (
        "missing-signer",
        _set("Packages/frontend/SignerID", ""),
        ("Packages.frontend: missing SignerID",),
    ),
    (
        "productid-negative",
        _set("Packages/frontend/ProductID", -1),
        ("Packages.frontend.ProductID: must be at least 0",),
    ),
    (
        "productid-float",
        _set("Packages/frontend/ProductID", 1.5),
        ("Packages.frontend.ProductID: expected an integer",),
    ),
    (
        "debug-not-bool",
        _set("Packages/backend/Debug", "yes"),
        ("Packages.backend.Debug: expected true or false",),
    ),
    (
        "tcb-unknown",
        _set("Packages/backend/AcceptedTCBStatuses", ["UpToDate", "SWHardeningNeded"]),
        ("Packages.backend.AcceptedTCBStatuses[1]", "did you mean 'SWHardeningNeeded'"),
    ),
    # Infrastructures
    (
        "infra-qesvn",
        _set("Infrastructures/Azure", {"QESVN": 70000}),
        ("Infrastructures.Azure.QESVN: must be at most 65535",),
    ),
    (
        "infra-cpusvn",
        _set("Infrastructures/Azure", {"CPUSVN": "!!"}),
        ("Infrastructures.Azure.CPUSVN: invalid base64",),
    ),
    (
        "infra-unknown",
        _set("Infrastructures/Azure", {"RootCa": "", "Cpusvm": ""}),
        ("Infrastructures.Azure: unknown key 'Cpusvm' (did you mean 'CPUSVN'?)",),
    ),
    # Marbles
    (
        "marble-no-package",
        _set(f"{M}/Package", _DELETE),
        ("Marbles.backendFirst: missing required key 'Package'",),
    ),
    (
        "marble-package-unknown",
        _set(f"{M}/Package", "backnd"),
        ("Marbles.backendFirst.Package: no package named 'backnd' (did you mean 'backend'?)",),
    ),
    (
        "marble-maxact-negative",
        _set(f"{M}/MaxActivations", -2),
        ("Marbles.backendFirst.MaxActivations: must be at least 0",),
    ),
    (
        "marble-tls-unknown",
        _set(f"{M}/TLS", ["backendFirstTLs"]),
        (
            "Marbles.backendFirst.TLS[0]: no TLS tag named 'backendFirstTLs'",
            "did you mean 'backendFirstTLS'",
        ),
    ),
    (
        "marble-dsb-type",
        _set(f"{M}/DisableSecretBinding", 1),
        ("Marbles.backendFirst.DisableSecretBinding: expected true or false",),
    ),
    (
        "file-bad-base64",
        _set(f"{P}/Files/~x", {"Data": "Zm9v!", "Encoding": "base64"}),
        ("Marbles.backendFirst.Parameters.Files.~x.Data: invalid base64",),
    ),
    (
        "file-bad-hex",
        _set(f"{P}/Files/~x", {"Data": "abc", "Encoding": "hex"}),
        ("Parameters.Files.~x.Data: invalid hex",),
    ),
    (
        "file-hex-space",
        _set(f"{P}/Files/~x", {"Data": "ab cd", "Encoding": "hex"}),
        ("Parameters.Files.~x.Data: invalid hex",),
    ),
    (
        "file-bad-encoding",
        _set(f"{P}/Files/~x", {"Data": "", "Encoding": "base46"}),
        ("Parameters.Files.~x.Encoding: unknown encoding 'base46' (did you mean 'base64'?)",),
    ),
    (
        "file-unknown-key",
        _set(f"{P}/Files/~x", {"Data": "", "NoTemplate": True}),
        ("Parameters.Files.~x: unknown key 'NoTemplate' (did you mean 'NoTemplates'?)",),
    ),
    (
        "file-number",
        _set(f"{P}/Files/~x", 5),
        ("Parameters.Files.~x: expected a string or a mapping",),
    ),
    (
        "env-nul",
        _set(f"{P}/Env/BAD", "a\x00b"),
        (
            "Marbles.backendFirst.Parameters.Env.BAD: an environment variable must not "
            "contain a NUL byte",
        ),
    ),
    (
        "env-nul-base64",
        _set(f"{P}/Env/BAD", {"Data": "YQBi", "Encoding": "base64"}),
        ("Parameters.Env.BAD: an environment variable must not contain a NUL",),
    ),
    (
        "env-name-equals",
        _set(f"{P}/Env/A=B", "x"),
        ("Parameters.Env.A=B: an environment variable name must not contain '='",),
    ),
    (
        "argv-not-list",
        _set(f"{P}/Argv", "./backend"),
        ("Marbles.backendFirst.Parameters.Argv: expected a list",),
    ),
    (
        "argv-nul",
        _set(f"{P}/Argv", ["a\x00"]),
        ("Parameters.Argv[0]: an argument must not contain a NUL",),
    ),
    (
        "params-unknown",
        _set(f"{P}/Envs", {}),
        ("Marbles.backendFirst.Parameters: unknown key 'Envs' (did you mean 'Env'?)",),
    ),
    # Secrets
    (
        "secret-type-unknown",
        _set("Secrets/k", {"Type": "symmetric_key", "Size": 128}),
        ("Secrets.k.Type: unknown secret type 'symmetric_key' (did you mean 'symmetric-key'?)",),
    ),
    (
        "secret-type-missing",
        _set("Secrets/k", {"Size": 128}),
        ("Secrets.k: missing required key 'Type'",),
    ),
    (
        "symmetric-size-zero",
        _set("Secrets/k", {"Type": "symmetric-key"}),
        ("Secrets.k: symmetric-key Size", "multiple of 8"),
    ),
    (
        "symmetric-size-odd",
        _set("Secrets/k", {"Type": "symmetric-key", "Size": 100}),
        ("Secrets.k.Size: symmetric-key Size", "(got 100)"),
    ),
    (
        "ecdsa-size",
        _set("Secrets/k", {"Type": "cert-ecdsa", "Size": 512}),
        ("Secrets.k.Size: cert-ecdsa Size must name a curve: one of 224, 256, 384, 521",),
    ),
    (
        "rsa-size",
        _set("Secrets/k", {"Type": "cert-rsa", "Size": 1024}),
        ("Secrets.k.Size: cert-rsa Size must be at least 2048",),
    ),
    (
        "ed25519-size",
        _set("Secrets/k", {"Type": "cert-ed25519", "Size": 256}),
        ("Secrets.k.Size: cert-ed25519 keys have a fixed size",),
    ),
    (
        "plain-generated",
        _set("Secrets/k", {"Type": "plain"}),
        ("Secrets.k: a 'plain' secret is never generated: set UserDefined: true",),
    ),
    (
        "validfor-symmetric",
        _set("Secrets/k", {"Type": "symmetric-key", "Size": 128, "ValidFor": 3}),
        ("Secrets.k.ValidFor: only certificate secrets have a validity",),
    ),
    (
        "validfor-and-notafter",
        _set("Secrets/rsaCert/Cert/NotAfter", "2031-01-01T00:00:00Z"),
        ("Secrets.rsaCert.ValidFor: give either ValidFor or Cert.NotAfter, not both",),
    ),
    (
        "cert-on-symmetric",
        _set("Secrets/k", {"Type": "symmetric-key", "Size": 128, "Cert": {"DNSNames": ["a"]}}),
        ("Secrets.k.Cert: only certificate secrets take a Cert template",),
    ),
    (
        "cert-unsupported-field",
        _set("Secrets/rsaCert/Cert/KeyUsage", 5),
        (
            "Secrets.rsaCert.Cert.KeyUsage: x509 certificate template field 'KeyUsage' is not "
            "supported",
            "supported: Subject, DNSNames, IPAddresses, NotAfter",
        ),
    ),
    (
        "cert-unknown-field",
        _set("Secrets/rsaCert/Cert/DNSName", ["a"]),
        ("Secrets.rsaCert.Cert: unknown key 'DNSName' (did you mean 'DNSNames'?)",),
    ),
    (
        "cert-subject-unsupported",
        _set("Secrets/rsaCert/Cert/Subject/Country", ["DE"]),
        ("Secrets.rsaCert.Cert.Subject.Country: x509 subject field 'Country' is not supported",),
    ),
    (
        "cert-bad-ip",
        _set("Secrets/ecdsaCert/Cert/IPAddresses", ["10.0.0.300"]),
        ("Secrets.ecdsaCert.Cert.IPAddresses[0]: not an IP address",),
    ),
    (
        "cert-bad-notafter",
        _set("Secrets/ecdsaCert/Cert/NotAfter", "2030-01-01"),
        ("Secrets.ecdsaCert.Cert.NotAfter: not an RFC 3339 timestamp",),
    ),
    (
        "cert-bad-date",
        _set("Secrets/ecdsaCert/Cert/NotAfter", "2030-02-30T00:00:00Z"),
        ("Secrets.ecdsaCert.Cert.NotAfter: not a valid date",),
    ),
    (
        "secret-private",
        _set("Secrets/secretAESKey/Private", "QUFB"),
        ("Secrets.secretAESKey.Private: is filled in by the coordinator",),
    ),
    # Users and Roles
    (
        "user-no-cert",
        _set("Users/alice/Certificate", _DELETE),
        ("Users.alice: missing required key 'Certificate'",),
    ),
    (
        "user-bad-cert",
        _set(
            "Users/alice/Certificate",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ),
        ("Users.alice.Certificate: not a PEM X.509 certificate",),
    ),
    (
        "user-unknown-role",
        _set("Users/alice/Roles", ["secretManagr"]),
        ("Users.alice.Roles[0]: no role named 'secretManagr' (did you mean 'secretManager'?)",),
    ),
    (
        "role-type",
        _set("Roles/updateFrontend/ResourceType", "Package"),
        (
            "Roles.updateFrontend.ResourceType: must be one of Packages, Secrets, Manifest",
            "did you mean 'Packages'",
        ),
    ),
    (
        "role-type-missing",
        _set("Roles/updateFrontend/ResourceType", _DELETE),
        ("Roles.updateFrontend: missing required key 'ResourceType'",),
    ),
    (
        "role-package-unknown",
        _set("Roles/updateFrontend/ResourceNames", ["frontnd"]),
        ("Roles.updateFrontend.ResourceNames[0]: no package named 'frontnd'",),
    ),
    (
        "role-package-action",
        _set("Roles/updateFrontend/Actions", ["UpdateManifest"]),
        (
            "Roles.updateFrontend.Actions[0]: unknown action 'UpdateManifest' for "
            "ResourceType Packages",
        ),
    ),
    (
        "role-secret-unknown",
        _set("Roles/secretManager/ResourceNames", ["nope"]),
        ("Roles.secretManager.ResourceNames[0]: no secret named 'nope'",),
    ),
    (
        "role-secret-action",
        _set("Roles/secretManager/Actions", ["ReadSecrets"]),
        (
            "Roles.secretManager.Actions[0]: unknown action 'ReadSecrets'",
            "did you mean 'ReadSecret'",
        ),
    ),
    (
        "role-write-generated",
        _set("Roles/readShared/Actions", ["WriteSecret"]),
        ("Roles.readShared.ResourceNames[0]: WriteSecret needs a user-defined secret",),
    ),
    (
        "role-read-unique",
        _set("Roles/readShared/ResourceNames", ["uniqueKey"]),
        ("Roles.readShared.ResourceNames[0]: ReadSecret needs a shared or user-defined secret",),
    ),
    (
        "role-manifest-names",
        _set("Roles/updateManifest/ResourceNames", ["x"]),
        (
            "Roles.updateManifest.ResourceNames: a role of ResourceType Manifest takes no "
            "ResourceNames",
        ),
    ),
    (
        "role-manifest-action",
        _set("Roles/updateManifest/Actions", ["ReadSecret"]),
        ("Roles.updateManifest.Actions[0]: unknown action 'ReadSecret' for ResourceType Manifest",),
    ),
    # RecoveryKeys
    (
        "recovery-not-pem",
        _set("RecoveryKeys/recoveryKey1", "ssh-rsa AAAA"),
        ("RecoveryKeys.recoveryKey1: not a PEM public key",),
    ),
    # Config
    (
        "sealmode",
        _set("Config/SealMode", "ProductKy"),
        (
            "Config.SealMode: must be one of ProductKey, UniqueKey, Disabled",
            "did you mean 'ProductKey'",
        ),
    ),
    (
        "featuregate",
        _set("Config/FeatureGates", ["MonotonicCountr"]),
        (
            "Config.FeatureGates[0]: must be one of SignQuoteEndpoint, MonotonicCounter",
            "did you mean 'MonotonicCounter'",
        ),
    ),
    (
        "featuregate-azure",
        _set("Config/FeatureGates", ["AzureHSMSealing"]),
        ("Config.FeatureGates[0]: AzureHSMSealing is not supported by meshproxy",),
    ),
    (
        "update-threshold",
        _set("Config/UpdateThreshold", 2),
        (
            "Config.UpdateThreshold: 2 acknowledgements needed but only 1 user(s) hold "
            "UpdateManifest",
        ),
    ),
    (
        "recovery-threshold-one",
        _set("Config/RecoveryThreshold", 1),
        ("Config.RecoveryThreshold: must be 0 (all keys) or at least 2",),
    ),
    (
        "recovery-threshold-many",
        _set("Config/RecoveryThreshold", 2),
        ("Config.RecoveryThreshold: 2 exceeds the number of RecoveryKeys (1)",),
    ),
    (
        "config-unknown",
        _set("Config/SealMod", "x"),
        ("Config: unknown key 'SealMod' (did you mean 'SealMode'?)",),
    ),
    # TLS
    (
        "tls-in-port",
        _set("TLS/backendFirstTLS/Incoming/0", {}),
        ("TLS.backendFirstTLS.Incoming[0]: missing required key 'Port'",),
    ),
    (
        "tls-in-cert-unknown",
        _set("TLS/backendFirstTLS/Incoming/1/Cert", "rsaCrt"),
        (
            "TLS.backendFirstTLS.Incoming[1].Cert: no secret named 'rsaCrt' (did you mean "
            "'rsaCert'?)",
        ),
    ),
    (
        "tls-in-cert-type",
        _set("TLS/backendFirstTLS/Incoming/1/Cert", "secretAESKey"),
        ("TLS.backendFirstTLS.Incoming[1].Cert: secret 'secretAESKey' is a symmetric-key",),
    ),
    (
        "tls-in-cert-client-auth",
        _set("TLS/backendFirstTLS/Incoming/1/DisableClientAuth", False),
        ("TLS.backendFirstTLS.Incoming[1]: an entry with its own Cert serves outside clients",),
    ),
    (
        "tls-in-no-client-auth",
        _set("TLS/backendFirstTLS/Incoming/0/DisableClientAuth", True),
        (
            "TLS.backendFirstTLS.Incoming[0].DisableClientAuth: client authentication can "
            "only be disabled",
        ),
    ),
    (
        "tls-out-addr",
        _set("TLS/backendFirstTLS/Outgoing/0/Addr", _DELETE),
        ("TLS.backendFirstTLS.Outgoing[0]: missing required key 'Addr'",),
    ),
    (
        "tls-out-port",
        _set("TLS/backendFirstTLS/Outgoing/0/Port", ""),
        ("TLS.backendFirstTLS.Outgoing[0]: missing required key 'Port'",),
    ),
    (
        "tls-out-cert",
        _set("TLS/backendFirstTLS/Outgoing/0/Cert", "rsaCert"),
        ("TLS.backendFirstTLS.Outgoing[0].Cert: only Incoming entries take this key",),
    ),
    # Mesh
    (
        "mesh-domain-upper",
        _set("Mesh/TrustDomain", "Demo.local"),
        ("Mesh.TrustDomain: must be lower case",),
    ),
    (
        "mesh-domain-bad",
        _set("Mesh/TrustDomain", "demo..local"),
        ("Mesh.TrustDomain: not a DNS-like name",),
    ),
    (
        "mesh-domain-slash",
        _set("Mesh/TrustDomain", "spiffe://demo"),
        ("Mesh.TrustDomain: not a DNS-like name",),
    ),
    (
        "mesh-lifetime-short",
        _set("Mesh/CertificateLifetime", "30s"),
        ("Mesh.CertificateLifetime: must be between 1m and 365d",),
    ),
    (
        "mesh-lifetime-long",
        _set("Mesh/CertificateLifetime", "366d"),
        ("Mesh.CertificateLifetime: must be between 1m and 365d",),
    ),
    (
        "mesh-lifetime-bad",
        _set("Mesh/CertificateLifetime", "soon"),
        ("Mesh.CertificateLifetime: invalid duration 'soon'",),
    ),
    (
        "mesh-allow-callee",
        _set("Mesh/Allow/backend", ["frontend"]),
        ("Mesh.Allow.backend: no marble named 'backend' (did you mean 'backendFirst'?)",),
    ),
    (
        "mesh-allow-caller",
        _set("Mesh/Allow/frontend", ["frontnd"]),
        ("Mesh.Allow.frontend[0]: no marble named 'frontnd' (did you mean 'frontend'?)",),
    ),
    (
        "mesh-unknown",
        _set("Mesh/TrustDomian", "x"),
        ("Mesh: unknown key 'TrustDomian' (did you mean 'TrustDomain'?)",),
    ),
    # Templates (the dry run parse_manifest runs)
    (
        "template-undefined",
        _set(f"{P}/Env/X", "{{ hex .Secrets.secretAESkey }}"),
        (
            "manifest.json: Marbles.backendFirst.Parameters.Env.X: column 8: "
            ".Secrets.secretAESkey: undefined secret 'secretAESkey' (did you mean "
            "'secretAESKey'?)",
        ),
    ),
    (
        "template-wrong-part",
        _set(f"{P}/Files/~x", "{{ pem .Secrets.secretAESKey.Cert }}"),
        (
            "Parameters.Files.~x: column 8: .Secrets.secretAESKey.Cert: a symmetric-key "
            "secret has no certificate",
        ),
    ),
    (
        "template-string-type",
        _set(f"{P}/Env/X", "{{ string .Secrets.secretAESKey }}"),
        ("Parameters.Env.X: column 11", "string takes a plain secret"),
    ),
    (
        "template-raw-env",
        _set(f"{P}/Env/X", "{{ raw .Secrets.secretAESKey }}"),
        ("Parameters.Env.X: column 4: raw is only for Files",),
    ),
]


@pytest.mark.parametrize(("mutate", "fragments"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule_is_enforced_with_path(mutate: Mutation, fragments: tuple[str, ...]) -> None:
    doc = full()
    mutate(doc)
    message = refused(doc, "manifest.json: ", *fragments)
    assert "Traceback" not in message


def test_rule_table_covers_valid_baseline() -> None:
    # Every mutation above starts from a manifest that loads.
    load(full())


# -- accepted variants ------------------------------------------------------------------
def test_encodings_are_decoded_case_insensitively() -> None:
    doc = minimal()
    doc["Marbles"]["backend"]["Parameters"] = {
        "Files": {
            "/b64": {"Data": "AAEC\n/w==", "Encoding": "Base64", "NoTemplates": True},
            "/hex": {"Data": "DEADbeef", "Encoding": "HEX"},
            "/str": {"Data": "plain", "Encoding": ""},
            "/default": {"Data": "x"},
            "/empty": {},
        }
    }
    files = load(doc).marbles["backend"].parameters.files
    assert files["/b64"].data == b"\x00\x01\x02\xff"
    assert files["/hex"].data == b"\xde\xad\xbe\xef"
    assert files["/str"].data == b"plain"
    assert files["/default"].data == b"x"
    assert not files["/default"].no_templates
    assert files["/empty"].data == b""


def test_package_defaults_and_debug_exemption() -> None:
    doc = minimal()
    doc["Packages"]["dbg"] = {"Debug": True, "UniqueID": UNIQUE_ID, "SignerID": SIGNER_ID}
    doc["Packages"]["unused"] = {"SignerID": SIGNER_ID}  # MarbleRun checks used packages only
    doc["Marbles"]["dbg"] = {"Package": "dbg"}
    m = load(doc)
    assert m.packages["backend"].accepted_tcb_statuses == ("UpToDate", "SWHardeningNeeded")
    assert m.packages["dbg"].debug
    assert m.packages["dbg"].signer_id is not None


def test_null_means_absent_like_go() -> None:
    doc = minimal()
    doc["Marbles"]["backend"].update({"MaxActivations": None, "TLS": None, "Parameters": None})
    doc.update({"Secrets": None, "Users": None, "Config": None, "Mesh": None})
    m = load(doc)
    assert m.marbles["backend"].max_activations == 0
    assert m.config.seal_mode == "ProductKey"


def test_user_defined_secrets_need_no_size() -> None:
    doc = minimal()
    doc["Secrets"] = {
        "k": {"Type": "symmetric-key", "UserDefined": True},
        "c": {"Type": "cert-rsa", "UserDefined": True},
    }
    assert load(doc).secrets["k"].size == 0


def test_yaml_timestamp_for_not_after() -> None:
    text = (DATA / "mesh.yaml").read_bytes()
    m = parse_manifest(text, "mesh.yaml")
    stamp = m.secrets["storeCert"].cert.not_after
    assert stamp is not None
    assert stamp.utcoffset() is not None
    assert stamp.hour == 12


def test_not_after_offset_is_normalised_to_utc() -> None:
    doc = full()
    doc["Secrets"]["ecdsaCert"]["Cert"]["NotAfter"] = "2030-01-01T02:00:00.123456789+02:00"
    stamp = load(doc).secrets["ecdsaCert"].cert.not_after
    assert stamp is not None
    assert (stamp.hour, stamp.microsecond) == (0, 123456)


def test_duplicate_user_certificate_is_refused() -> None:
    doc = full()
    doc["Users"]["bob"]["Certificate"] = doc["Users"]["alice"]["Certificate"]
    refused(doc, "Users.bob.Certificate: the same certificate is already given for user 'alice'")


def test_recovery_key_must_be_rsa() -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    doc = full()
    doc["RecoveryKeys"]["ec"] = pem
    refused(doc, "RecoveryKeys.ec: a recovery key must be an RSA public key")


def test_config_thresholds_within_limits_are_accepted() -> None:
    doc = full()
    doc["Config"]["SealMode"] = ""
    m = load(doc)
    assert m.config.seal_mode == "ProductKey"
    assert m.config.recovery_threshold == 0


# -- Mesh -------------------------------------------------------------------------------
def test_mesh_defaults_when_absent() -> None:
    m = load(minimal())
    assert m.mesh.trust_domain == "meshproxy.local"
    assert m.mesh.certificate_lifetime == 24 * 3600
    assert dict(m.mesh.allow) == {}


def test_callers_of_fails_closed() -> None:
    doc = full()
    m = load(doc)
    assert m.mesh.callers_of("frontend") == ()  # listed with nobody
    assert m.mesh.callers_of("nosuchmarble") == ()  # not listed at all
    assert m.mesh.callers_of("backendFirst") == ("frontend",)


def test_mesh_lifetime_bounds_are_inclusive() -> None:
    doc = minimal()
    doc["Mesh"] = {"CertificateLifetime": "1m"}
    assert load(doc).mesh.certificate_lifetime == 60
    doc["Mesh"] = {"CertificateLifetime": "365d"}
    assert load(doc).mesh.certificate_lifetime == 365 * 86400
