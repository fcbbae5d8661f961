"""Manifest bytes -> ``Manifest``, with every rule of MarbleRun's ``Check`` and ours.

A manifest MarbleRun accepts is accepted here, with one deliberate difference: keys
MarbleRun would silently ignore (typos, fields that cannot apply) are errors naming their
path. Keys match case-insensitively, as Go's encoding/json matches struct fields; names
(of marbles, secrets, ...) match exactly. Sections are read in dependency order so that
each reference is checked where it is written.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshproxy.config import Node, parse_document
from meshproxy.errors import ManifestError
from meshproxy.manifest._access import parse_config, parse_recovery_keys, parse_roles, parse_users
from meshproxy.manifest._check import check_manifest_templates
from meshproxy.manifest._connections import parse_mesh, parse_tls
from meshproxy.manifest._model import (
    DEFAULT_TCB_STATUSES,
    TCB_STATUSES,
    FileValue,
    Manifest,
    Marble,
    Package,
    Parameters,
    TLSTag,
)
from meshproxy.manifest._read import (
    decode_base64,
    decode_hex,
    frozen,
    names,
    opt_bool,
    opt_str,
    opt_uint,
    present,
    reject_nul,
    suggest,
    utf8,
)
from meshproxy.manifest._secrets import parse_secrets

_TOP_KEYS = (
    "Packages", "Infrastructures", "Marbles", "Users", "Secrets", "RecoveryKeys", "Roles",
    "TLS", "Config", "Mesh",
)  # fmt: skip
_PACKAGE_KEYS = (
    "Debug", "UniqueID", "SignerID", "ProductID", "SecurityVersion", "AcceptedTCBStatuses",
    "AcceptedAdvisories",
)  # fmt: skip
_MARBLE_KEYS = ("Package", "MaxActivations", "Parameters", "TLS", "DisableSecretBinding")
_ENCODINGS = ("string", "base64", "hex")


def parse_manifest(raw: bytes, source: str = "manifest") -> Manifest:
    """Parse and validate a manifest (JSON or YAML); errors name ``source`` and key path."""
    if not isinstance(raw, bytes):
        raise TypeError("parse_manifest takes the manifest's bytes")
    try:
        document = parse_document(raw, source, ManifestError)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        # YAML can build values Python refuses (a 31st of February, a list as a key).
        raise ManifestError(f"{source}: not a valid document: {exc}") from None
    root = Node(document, source, "", ManifestError)
    top = root.mapping(_TOP_KEYS, case_insensitive=True)

    packages, package_nodes = _packages(_required(root, top, "Packages", "package"))
    _infrastructures(present(top, "Infrastructures"))
    secrets = parse_secrets(present(top, "Secrets"))
    tls = parse_tls(present(top, "TLS"), secrets)
    marble_node = _required(root, top, "Marbles", "marble")
    marbles = {
        name: _marble(name, child, packages, package_nodes, tls)
        for name, child in marble_node.items().items()
    }
    roles = parse_roles(present(top, "Roles"), packages, secrets)
    users = parse_users(present(top, "Users"), roles)
    recovery_keys = parse_recovery_keys(present(top, "RecoveryKeys"))
    manifest = Manifest(
        raw=raw,
        packages=frozen(packages),
        marbles=frozen(marbles),
        secrets=frozen(secrets),
        users=frozen(users),
        roles=frozen(roles),
        recovery_keys=frozen(recovery_keys),
        tls=frozen(tls),
        config=parse_config(present(top, "Config"), users, roles, recovery_keys),
        mesh=parse_mesh(present(top, "Mesh"), marbles),
    )
    check_manifest_templates(manifest, f"{source}: ")
    return manifest


def _required(root: Node, top: Mapping[str, Node], key: str, what: str) -> Node:
    node = present(top, key)
    if node is None:
        root.fail(f"missing required key {key!r} (at least one {what})")
    if not node.items():
        node.fail(f"at least one {what} is required")
    return node


# -- Packages ---------------------------------------------------------------------------
def _packages(node: Node) -> tuple[dict[str, Package], dict[str, Node]]:
    packages: dict[str, Package] = {}
    nodes = node.items()
    for name, child in nodes.items():
        fields = child.mapping(_PACKAGE_KEYS, case_insensitive=True)
        statuses: list[str] = []
        status_node = present(fields, "AcceptedTCBStatuses")
        for status in status_node.list() if status_node is not None else []:
            statuses.append(status.choice(TCB_STATUSES))
        packages[name] = Package(
            name=name,
            unique_id=_measurement(fields, "UniqueID"),
            signer_id=_measurement(fields, "SignerID"),
            product_id=opt_uint(fields, "ProductID"),
            security_version=opt_uint(fields, "SecurityVersion"),
            debug=opt_bool(fields, "Debug"),
            accepted_tcb_statuses=tuple(dict.fromkeys(statuses)) or DEFAULT_TCB_STATUSES,
            accepted_advisories=names(present(fields, "AcceptedAdvisories")),
        )
    return packages, nodes


def _measurement(fields: Mapping[str, Node], key: str) -> bytes | None:
    text = opt_str(fields, key)
    if not text:
        return None  # Go's "" is "unset"
    if len(text) != 64:
        fields[key].fail(f"must be 64 hex digits (32 bytes), got {len(text)} characters")
    return decode_hex(fields[key], text)


def _check_identity(package: Package, node: Node, marble: str) -> None:
    """MarbleRun's rule, for each package a marble uses; Debug packages are exempt."""
    if package.debug:
        return
    has_signer = any(
        v is not None for v in (package.signer_id, package.product_id, package.security_version)
    )
    if package.unique_id is not None and has_signer:
        node.fail(
            "give either UniqueID or SignerID/ProductID/SecurityVersion, not both "
            "(allowed only with Debug: true)"
        )
    if package.unique_id is None:
        for key, value in (
            ("SignerID", package.signer_id),
            ("ProductID", package.product_id),
            ("SecurityVersion", package.security_version),
        ):
            if value is None:
                node.fail(
                    f"missing {key}: used by Marbles.{marble}, the package needs UniqueID, "
                    "or SignerID, ProductID and SecurityVersion"
                )


def _infrastructures(node: Node | None) -> None:
    # MarbleRun stores these but never enforces them; they are validated and dropped.
    for _, child in node.items().items() if node is not None else []:
        fields = child.mapping(("CPUSVN", "QESVN", "PCESVN", "RootCA"), case_insensitive=True)
        for key in ("QESVN", "PCESVN"):
            opt_uint(fields, key, maximum=0xFFFF)
        for key in ("CPUSVN", "RootCA"):
            value = present(fields, key)
            if value is not None:
                decode_base64(value, value.str(allow_empty=True))


# -- Marbles ----------------------------------------------------------------------------
def _marble(
    name: str,
    node: Node,
    packages: Mapping[str, Package],
    package_nodes: Mapping[str, Node],
    tls: Mapping[str, TLSTag],
) -> Marble:
    fields = node.mapping(_MARBLE_KEYS, case_insensitive=True)
    package_node = present(fields, "Package")
    if package_node is None:
        node.fail("missing required key 'Package'")
    package = package_node.str()
    if package not in packages:
        package_node.fail(f"no package named {package!r}{suggest(package, packages)}")
    _check_identity(packages[package], package_nodes[package], name)
    tags_node = present(fields, "TLS")
    for tag_node in tags_node.list() if tags_node is not None else []:
        tag = tag_node.str()
        if tag not in tls:
            tag_node.fail(f"no TLS tag named {tag!r}{suggest(tag, tls)}")
    return Marble(
        name=name,
        package=package,
        max_activations=opt_uint(fields, "MaxActivations") or 0,
        parameters=_parameters(present(fields, "Parameters")),
        tls=names(tags_node),
        disable_secret_binding=opt_bool(fields, "DisableSecretBinding"),
    )


def _parameters(node: Node | None) -> Parameters:
    if node is None:
        return Parameters(frozen({}), frozen({}), ())
    fields = node.mapping(("Files", "Env", "Argv"), case_insensitive=True)
    files_node, env_node = present(fields, "Files"), present(fields, "Env")
    files = {}
    for path, child in files_node.items().items() if files_node is not None else []:
        reject_nul(child, path, "a file path")
        files[path] = _file_value(child)
    env = {}
    for key, child in env_node.items().items() if env_node is not None else []:
        if "=" in key or "\x00" in key:
            child.fail("an environment variable name must not contain '=' or NUL")
        value = _file_value(child)
        if b"\x00" in value.data:
            child.fail("an environment variable must not contain a NUL byte")
        env[key] = value
    argv_node = present(fields, "Argv")
    argv = () if argv_node is None else tuple(_arg(n) for n in argv_node.list())
    return Parameters(frozen(files), frozen(env), argv)


def _arg(node: Node) -> str:
    text = node.str(allow_empty=True)
    reject_nul(node, text, "an argument")
    return text


def _file_value(node: Node) -> FileValue:
    """A plain string, or ``{Data, Encoding, NoTemplates}`` decoded now (MarbleRun's File)."""
    if isinstance(node.value, str):
        return FileValue(utf8(node.value), no_templates=False)
    if not isinstance(node.value, Mapping):
        node.fail("expected a string or a mapping {Data, Encoding, NoTemplates}")
    fields = node.mapping(("Data", "Encoding", "NoTemplates"), case_insensitive=True)
    data = opt_str(fields, "Data")
    encoding = opt_str(fields, "Encoding").lower() or "string"
    if encoding not in _ENCODINGS:
        fields["Encoding"].fail(
            f"unknown encoding {encoding!r}{suggest(encoding, _ENCODINGS)}; "
            f"one of {', '.join(_ENCODINGS)}"
        )
    where = fields.get("Data", node)
    if encoding == "base64":
        decoded = decode_base64(where, data)
    elif encoding == "hex":
        decoded = decode_hex(where, data)
    else:
        decoded = utf8(data)
    return FileValue(decoded, no_templates=opt_bool(fields, "NoTemplates"))
