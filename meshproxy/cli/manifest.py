"""``meshproxy manifest set|get|verify|log|update``."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from meshproxy.attestation import describe_coordinator_policy
from meshproxy.cli._common import (
    add_coordinator_options,
    add_user_options,
    attest,
    connect,
    file_name,
    read_file,
    saved_root_path,
    user_identity,
    write_output,
)
from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator.client import Connection
from meshproxy.errors import ManifestError, PolicyError, UsageError
from meshproxy.manifest import parse_manifest
from meshproxy.pki import cert_to_pem

RECOVERY_SUFFIX = ".recovery-secret"


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "manifest",
        help="set, get, verify and update the manifest",
        description="Manage the manifest.",
    )
    msub = p.add_subparsers(dest="manifest_command", metavar="SUBCOMMAND", required=True)

    s = msub.add_parser(
        "set",
        help="set the first manifest",
        description="Validate FILE locally, then set it as the coordinator's manifest. If the "
        "manifest has RecoveryKeys, the encrypted recovery secrets the coordinator returns "
        "are saved as DIR/<key name>.recovery-secret (and printed as JSON on stdout); keep "
        "each with the holder of that key. A coordinator started with an owner accepts the "
        "first manifest only with the owner's certificate (--cert/--key) or token.",
    )
    s.add_argument("file", type=Path, metavar="FILE")
    add_coordinator_options(s)
    add_user_options(s, required=False)
    _recovery_dir_option(s)
    token = s.add_mutually_exclusive_group()
    token.add_argument("--owner-token", metavar="TOKEN", help="the coordinator owner's token")
    token.add_argument(
        "--owner-token-file", type=Path, metavar="FILE", help="read the owner's token from FILE"
    )
    s.set_defaults(func=_set)

    g = msub.add_parser("get", help="print the manifest the coordinator enforces")
    add_coordinator_options(g)
    g.add_argument("-o", "--output", type=Path, help="write the manifest here (default stdout)")
    g.set_defaults(func=_get)

    v = msub.add_parser(
        "verify",
        help="verify the whole cluster with one attestation",
        description="Verify the coordinator's quote (fresh nonce, bound root certificate), "
        "check its enclave identity against the --policy file, then check that it enforces "
        "exactly FILE (SHA-256 fingerprint). Only then save the root certificate, which "
        "later commands and clients pin. Exit 0 only if all holds. The policy file (YAML or "
        "JSON, MarbleRun's coordinator-era.json keys) pins UniqueID, or SignerID with "
        "ProductID and a minimum SecurityVersion; Debug (allowed, default false); "
        "AcceptedTCBStatuses; AcceptedAdvisories. Without --policy any coordinator enclave "
        "on a trusted platform passes, and a warning says so.",
    )
    v.add_argument("file", type=Path, metavar="FILE")
    add_coordinator_options(v)
    v.add_argument("-o", "--output", type=Path, metavar="ROOT_PEM", help="also write the root here")
    v.set_defaults(func=_verify)

    lg = msub.add_parser(
        "log",
        help="print the update log",
        description="Print the coordinator's update log: one JSON line per change (manifest "
        "set, package and manifest updates, secrets written, recoveries).",
    )
    add_coordinator_options(lg)
    lg.set_defaults(func=_log)

    u = msub.add_parser(
        "update",
        help="update the manifest (packages or the whole manifest)",
        description="Update the manifest. A FILE with only Packages.<name>.SecurityVersion is "
        "a package update, applied at once (UpdateSecurityVersion). Any other FILE is a full "
        "update (UpdateManifest): it applies once enough users acknowledged it "
        "(Config.UpdateThreshold, or all users holding UpdateManifest).",
    )
    usub = u.add_subparsers(dest="update_command", metavar="SUBCOMMAND", required=True)
    for name, text, func in (
        ("apply", "propose FILE as an update (and acknowledge it)", _apply),
        ("acknowledge", "acknowledge the pending update, which must be exactly FILE", _ack),
    ):
        c = usub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        c.add_argument("file", type=Path, metavar="FILE")
        add_coordinator_options(c)
        add_user_options(c)
        _recovery_dir_option(c)
        c.set_defaults(func=func)
    c = usub.add_parser("cancel", help="cancel the pending update", description="Cancel it.")
    add_coordinator_options(c)
    add_user_options(c)
    c.set_defaults(func=_cancel)
    c = usub.add_parser(
        "get",
        help="show the pending update",
        description="Print the pending update's manifest and who has yet to acknowledge it.",
    )
    add_coordinator_options(c)
    c.add_argument("-o", "--output", type=Path, help="write the pending manifest here")
    c.set_defaults(func=_pending)


def _recovery_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--recovery-dir",
        type=Path,
        default=Path(),
        metavar="DIR",
        help="where recovery secrets are saved (default: the current directory)",
    )


def save_recovery_secrets(secrets: dict[str, str], directory: Path) -> list[Path]:
    """Write each key's encrypted recovery secret (raw RSA-OAEP ciphertext, 0600)."""
    paths = []
    for name, value in sorted(secrets.items()):
        path = directory / f"{file_name(name, 'recovery key name')}{RECOVERY_SUFFIX}"
        write_output(path, base64.b64decode(value), private=True)
        paths.append(path)
    return paths


def _report_recovery(secrets: dict[str, str], directory: Path) -> None:
    if not secrets:
        return
    json.dump(secrets, sys.stdout, indent=2)
    print()
    for path in save_recovery_secrets(secrets, directory):
        print(f"recovery secret saved to {path}", file=sys.stderr)


def _set(args: argparse.Namespace) -> int:
    raw = read_file(args.file)
    parse_manifest(raw, args.file.name)  # fail here, with the file's name, before sending
    token = args.owner_token
    if args.owner_token_file is not None:
        token = read_file(args.owner_token_file, "--owner-token-file").decode().strip()
    headers = {wire.OWNER_TOKEN_HEADER: f"Bearer {token}"} if token else None
    conn = connect(args, identity=user_identity(args), headers=headers)
    data = conn.request("POST", wire.CLIENT_PATHS["manifest"], {"manifest": wire.b64e(raw)})
    print(f"manifest set (fingerprint {hashlib.sha256(raw).hexdigest()})", file=sys.stderr)
    _report_recovery((data or {}).get("RecoverySecrets") or {}, args.recovery_dir)
    return 0


def _get(args: argparse.Namespace) -> int:
    data = connect(args).request("GET", wire.CLIENT_PATHS["manifest"])
    raw = base64.b64decode(data["manifest"])
    print(f"fingerprint {data['manifestFingerprint']}", file=sys.stderr)
    write_output(args.output, raw)
    return 0


def _verify(args: argparse.Namespace) -> int:
    raw = read_file(args.file)
    expected = hashlib.sha256(raw).hexdigest()
    if args.root is not None:
        raise UsageError("manifest verify checks the coordinator's quote: --root is not used")
    try:
        evidence, policy = attest(args)
    except PolicyError as exc:
        raise PolicyError(f"{exc}; nothing saved") from None
    if policy is None:
        print(
            "meshproxy: warning: no --policy: the coordinator's enclave identity (UniqueID, "
            "or SignerID + ProductID + SecurityVersion) was not pinned, so any coordinator "
            "enclave on a trusted platform passes; give --policy FILE",
            file=sys.stderr,
        )
    data = Connection(args.coordinator, evidence.root, args.timeout).request(
        "GET", wire.CLIENT_PATHS["manifest"]
    )
    actual = data["manifestFingerprint"]
    if actual != expected:
        raise ManifestError(
            f"the coordinator enforces another manifest: fingerprint {actual}, "
            f"but {args.file} has {expected}"
        )
    ident = evidence.verified.identity
    root_pem = cert_to_pem(evidence.root)
    write_output(saved_root_path(args.coordinator), root_pem)
    if args.output is not None:
        write_output(args.output, root_pem)
    mode = "SIMULATED (no hardware isolation)" if evidence.verified.simulated else "hardware"
    pinned = (
        f"policy {args.policy} holds: {describe_coordinator_policy(policy)}"
        if policy is not None
        else "identity NOT pinned (no --policy)"
    )
    print(
        f"coordinator verified: {mode} quote, UniqueID {ident.unique_id.hex()}, "
        f"SignerID {ident.signer_id.hex()}, ProductID {ident.product_id}, "
        f"SecurityVersion {ident.security_version}, TCB {evidence.verified.tcb_status}\n"
        f"coordinator identity: {pinned}\n"
        f"manifest verified: fingerprint {actual}\n"
        f"root certificate saved to {args.output or saved_root_path(args.coordinator)}"
    )
    return 0


def _log(args: argparse.Namespace) -> int:
    data = connect(args).request("GET", wire.CLIENT_PATHS["update"])
    for line in data.get("updateLog") or []:
        print(line)
    return 0


def _print_update(data: dict[str, Any], args: argparse.Namespace) -> None:
    print(data.get("message", ""))
    missing = data.get("missingUsers") or []
    if data.get("missingAcknowledgments"):
        print(
            f"{data['missingAcknowledgments']} acknowledgement(s) missing; not yet "
            f"acknowledged by: {', '.join(missing) or '-'}"
        )
    _report_recovery(data.get("recoverySecrets") or {}, args.recovery_dir)


def _send_update(args: argparse.Namespace, path: str) -> int:
    raw = read_file(args.file)
    data = connect(args, identity=user_identity(args)).request(
        "POST", wire.CLIENT_PATHS[path], {"manifest": wire.b64e(raw)}
    )
    _print_update(data or {}, args)
    return 0


def _apply(args: argparse.Namespace) -> int:
    return _send_update(args, "update")


def _ack(args: argparse.Namespace) -> int:
    return _send_update(args, "update_manifest")


def _cancel(args: argparse.Namespace) -> int:
    data = connect(args, identity=user_identity(args)).request(
        "POST", wire.CLIENT_PATHS["update_cancel"], {}
    )
    print((data or {}).get("message", "update cancelled"))
    return 0


def _pending(args: argparse.Namespace) -> int:
    data = connect(args).request("GET", wire.CLIENT_PATHS["update_manifest"])
    raw = base64.b64decode(data["manifest"])
    print(
        f"pending update {hashlib.sha256(raw).hexdigest()}: "
        f"{data['missingAcknowledgments']} acknowledgement(s) missing; not yet acknowledged "
        f"by: {', '.join(data.get('missingUsers') or []) or '-'}",
        file=sys.stderr,
    )
    write_output(args.output, raw)
    return 0
