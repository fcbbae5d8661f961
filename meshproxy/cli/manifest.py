"""``meshproxy manifest set|get|verify``."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from meshproxy.cli._common import (
    add_coordinator_options,
    connect,
    saved_root_path,
    write_output,
)
from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator.client import Connection, fetch_evidence
from meshproxy.errors import ManifestError, UsageError
from meshproxy.manifest import parse_manifest
from meshproxy.pki import cert_to_pem


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "manifest", help="set, get and verify the manifest", description="Manage the manifest."
    )
    msub = p.add_subparsers(dest="manifest_command", metavar="SUBCOMMAND", required=True)

    s = msub.add_parser(
        "set",
        help="set the first manifest",
        description="Validate FILE locally, then set it as the coordinator's manifest.",
    )
    s.add_argument("file", type=Path, metavar="FILE")
    add_coordinator_options(s)
    s.set_defaults(func=_set)

    g = msub.add_parser("get", help="print the manifest the coordinator enforces")
    add_coordinator_options(g)
    g.add_argument("-o", "--output", type=Path, help="write the manifest here (default stdout)")
    g.set_defaults(func=_get)

    v = msub.add_parser(
        "verify",
        help="verify the whole cluster with one attestation",
        description="Verify the coordinator's quote (fresh nonce, bound root certificate), "
        "then check that it enforces exactly FILE (SHA-256 fingerprint). Only then save the "
        "root certificate, which later commands and clients pin. Exit 0 only if all holds.",
    )
    v.add_argument("file", type=Path, metavar="FILE")
    add_coordinator_options(v)
    v.add_argument("-o", "--output", type=Path, metavar="ROOT_PEM", help="also write the root here")
    v.set_defaults(func=_verify)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None


def _set(args: argparse.Namespace) -> int:
    raw = _read(args.file)
    parse_manifest(raw, args.file.name)  # fail here, with the file's name, before sending
    data = connect(args).request(
        "POST", wire.CLIENT_PATHS["manifest"], {"manifest": wire.b64e(raw)}
    )
    print(f"manifest set (fingerprint {hashlib.sha256(raw).hexdigest()})", file=sys.stderr)
    secrets = (data or {}).get("RecoverySecrets") or {}
    if secrets:
        json.dump(secrets, sys.stdout, indent=2)
        print()
    return 0


def _get(args: argparse.Namespace) -> int:
    data = connect(args).request("GET", wire.CLIENT_PATHS["manifest"])
    raw = base64.b64decode(data["manifest"])
    print(f"fingerprint {data['manifestFingerprint']}", file=sys.stderr)
    write_output(args.output, raw)
    return 0


def _verify(args: argparse.Namespace) -> int:
    raw = _read(args.file)
    expected = hashlib.sha256(raw).hexdigest()
    evidence = fetch_evidence(
        args.coordinator,
        accept_simulation=args.accept_simulation,
        platform_dir=args.platform_dir,
        timeout=args.timeout,
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
    print(
        f"coordinator verified: {mode} quote, UniqueID {ident.unique_id.hex()}, "
        f"SignerID {ident.signer_id.hex()}, ProductID {ident.product_id}, "
        f"SecurityVersion {ident.security_version}, TCB {evidence.verified.tcb_status}\n"
        f"manifest verified: fingerprint {actual}\n"
        f"root certificate saved to {args.output or saved_root_path(args.coordinator)}"
    )
    return 0
