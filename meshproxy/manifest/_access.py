"""``Roles``, ``Users``, ``RecoveryKeys`` and ``Config``: who may do what, and thresholds.

The rules are MarbleRun's ``Manifest.Check`` (marblerun.md 2.7, 2.8, 2.10): actions are
case-insensitive and stored lower-cased; a role may only name resources that exist and
only grant what the resource allows; every user has a certificate of its own.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from meshproxy.config import Node
from meshproxy.manifest._model import (
    FEATURE_GATES,
    SEAL_MODES,
    ManifestConfig,
    Package,
    Role,
    SecretSpec,
    User,
)
from meshproxy.manifest._read import names, opt_bool, opt_str, opt_uint, present, suggest

RESOURCE_TYPES = ("Packages", "Secrets", "Manifest")
# resource type -> {lower-cased action: spelling for messages}
_ACTIONS = {
    "Packages": {"updatesecurityversion": "UpdateSecurityVersion"},
    "Secrets": {"readsecret": "ReadSecret", "writesecret": "WriteSecret"},
    "Manifest": {"updatemanifest": "UpdateManifest"},
}


def parse_roles(
    node: Node | None, packages: Mapping[str, Package], secrets: Mapping[str, SecretSpec]
) -> dict[str, Role]:
    if node is None:
        return {}
    return {name: _role(name, child, packages, secrets) for name, child in node.items().items()}


def _role(
    name: str, node: Node, packages: Mapping[str, Package], secrets: Mapping[str, SecretSpec]
) -> Role:
    fields = node.mapping(("ResourceType", "ResourceNames", "Actions"), case_insensitive=True)
    type_node = present(fields, "ResourceType")
    if type_node is None:
        node.fail(f"missing required key 'ResourceType' (one of {', '.join(RESOURCE_TYPES)})")
    resource_type = type_node.choice(RESOURCE_TYPES)
    known = _ACTIONS[resource_type]
    actions: list[str] = []
    actions_node = present(fields, "Actions")
    for action_node in actions_node.list() if actions_node is not None else []:
        action = action_node.str()
        if action.lower() not in known:
            action_node.fail(
                f"unknown action {action!r} for ResourceType {resource_type}"
                f"{suggest(action, known.values())}; allowed: {', '.join(known.values())}"
            )
        actions.append(action.lower())
    resources_node = present(fields, "ResourceNames")
    resources = names(resources_node)
    if resources and resource_type == "Manifest":
        fields["ResourceNames"].fail("a role of ResourceType Manifest takes no ResourceNames")
    for where in resources_node.list() if resources_node is not None else []:
        resource = where.str()
        if resource_type == "Packages" and resource not in packages:
            where.fail(f"no package named {resource!r}{suggest(resource, packages)}")
        if resource_type == "Secrets":
            _check_secret_grant(where, resource, secrets, actions)
    return Role(name, resource_type, resources, tuple(dict.fromkeys(actions)))


def _check_secret_grant(
    where: Node, resource: str, secrets: Mapping[str, SecretSpec], actions: list[str]
) -> None:
    secret = secrets.get(resource)
    if secret is None:
        where.fail(f"no secret named {resource!r}{suggest(resource, secrets)}")
    if "writesecret" in actions and not secret.user_defined:
        where.fail(f"WriteSecret needs a user-defined secret; {resource!r} is generated")
    if "readsecret" in actions and not (secret.shared or secret.user_defined):
        where.fail(
            f"ReadSecret needs a shared or user-defined secret; {resource!r} is unique "
            "to each marble"
        )


def parse_users(node: Node | None, roles: Mapping[str, Role]) -> dict[str, User]:
    if node is None:
        return {}
    users: dict[str, User] = {}
    owners: dict[bytes, str] = {}
    for name, child in node.items().items():
        fields = child.mapping(("Certificate", "Roles"), case_insensitive=True)
        cert_node = present(fields, "Certificate")
        if cert_node is None or not cert_node.str(allow_empty=True):
            child.fail("missing required key 'Certificate' (the user's PEM certificate)")
        cert = _certificate(cert_node)
        der = cert.public_bytes(serialization.Encoding.DER)
        if der in owners:
            cert_node.fail(f"the same certificate is already given for user {owners[der]!r}")
        owners[der] = name
        roles_node = present(fields, "Roles")
        for role_node in roles_node.list() if roles_node is not None else []:
            role = role_node.str()
            if role not in roles:
                role_node.fail(f"no role named {role!r}{suggest(role, roles)}")
        user_roles = tuple(dict.fromkeys(names(roles_node)))
        users[name] = User(name, cert.public_bytes(serialization.Encoding.PEM), user_roles)
    return users


def _certificate(node: Node) -> x509.Certificate:
    text = node.str()
    try:
        # Like Go's pem.Decode, the first certificate block is the user's identity.
        return x509.load_pem_x509_certificates(text.encode("utf-8", "replace"))[0]
    except ValueError:
        node.fail("not a PEM X.509 certificate (-----BEGIN CERTIFICATE----- ...)")


def parse_recovery_keys(node: Node | None) -> dict[str, bytes]:
    if node is None:
        return {}
    keys: dict[str, bytes] = {}
    for name, child in node.items().items():
        text = child.str()
        try:
            key = serialization.load_pem_public_key(text.encode("utf-8", "replace"))
        except (ValueError, UnsupportedAlgorithm):
            child.fail("not a PEM public key (-----BEGIN PUBLIC KEY----- ...)")
        if not isinstance(key, rsa.RSAPublicKey):
            child.fail("a recovery key must be an RSA public key")
        keys[name] = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return keys


def parse_config(
    node: Node | None,
    users: Mapping[str, User],
    roles: Mapping[str, Role],
    recovery_keys: Mapping[str, bytes],
) -> ManifestConfig:
    if node is None:
        return ManifestConfig()
    fields = node.mapping(
        ("SealMode", "FeatureGates", "UpdateThreshold", "RecoveryThreshold", "RotateRootSecret"),
        case_insensitive=True,
    )
    seal_mode = opt_str(fields, "SealMode") or "ProductKey"
    if seal_mode not in SEAL_MODES:
        fields["SealMode"].choice(SEAL_MODES)
    gates = _feature_gates(present(fields, "FeatureGates"))

    update_threshold = opt_uint(fields, "UpdateThreshold") or 0
    updaters = sum(1 for user in users.values() if _can_update_manifest(user, roles))
    if update_threshold > updaters:
        fields["UpdateThreshold"].fail(
            f"{update_threshold} acknowledgements needed but only {updaters} user(s) hold "
            "UpdateManifest"
        )
    recovery_threshold = opt_uint(fields, "RecoveryThreshold") or 0
    if recovery_threshold == 1:
        fields["RecoveryThreshold"].fail("must be 0 (all keys) or at least 2; 1 is not allowed")
    if recovery_threshold > len(recovery_keys):
        fields["RecoveryThreshold"].fail(
            f"{recovery_threshold} exceeds the number of RecoveryKeys ({len(recovery_keys)})"
        )
    return ManifestConfig(
        seal_mode=seal_mode,
        feature_gates=gates,
        update_threshold=update_threshold,
        recovery_threshold=recovery_threshold,
        rotate_root_secret=opt_bool(fields, "RotateRootSecret"),
    )


def _feature_gates(node: Node | None) -> tuple[str, ...]:
    gates: list[str] = []
    for child in node.list() if node is not None else []:
        gate = child.str()
        if gate == "AzureHSMSealing":
            child.fail("AzureHSMSealing is not supported by meshproxy (no Azure Managed HSM)")
        if gate not in FEATURE_GATES:
            child.choice(FEATURE_GATES)
        gates.append(gate)
    return tuple(dict.fromkeys(gates))


def _can_update_manifest(user: User, roles: Mapping[str, Role]) -> bool:
    return any(
        roles[r].resource_type == "Manifest" and "updatemanifest" in roles[r].actions
        for r in user.roles
    )
