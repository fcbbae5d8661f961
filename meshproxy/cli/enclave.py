"""``meshproxy enclave ...`` (sign descriptions, show identities, make signer keys) and
``meshproxy quote verify`` (check a quote file against Intel or the simulation root)."""

from __future__ import annotations

import argparse
import binascii
import os
import string
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshproxy.attestation import (
    SimulationPlatform,
    TrustAnchor,
    default_platform_dir,
    intel_anchor,
    load_description,
    load_signed,
    measure,
    sign_description,
    signer_id_of,
    simulation_anchor,
    verify_quote,
    write_signed,
)
from meshproxy.config import load_file
from meshproxy.errors import AttestationError, ConfigError, UsageError

_Sub = argparse._SubParsersAction  # the type argparse gives add_subparsers()


def register(sub: _Sub[argparse.ArgumentParser]) -> None:
    group = sub.add_parser(
        "enclave",
        help="sign enclave descriptions, show UniqueID/SignerID, make signer keys",
        description="Simulated enclave measurement and signing (like EGo's `ego sign`).",
    )
    cmds = group.add_subparsers(dest="enclave_command", metavar="COMMAND", required=True)

    p = cmds.add_parser(
        "sign",
        help="measure and sign an enclave description",
        description="Measure the files of DESC and sign the result with KEY.",
    )
    p.add_argument("description", metavar="DESC", type=Path, help="enclave description (YAML)")
    p.add_argument("--key", required=True, type=Path, help="signer private key (PEM)")
    p.add_argument(
        "-o", "--output", type=Path, help="signed JSON to write (default: DESC_STEM.signed.json)"
    )
    p.set_defaults(func=_sign)

    p = cmds.add_parser(
        "uniqueid",
        help="print the UniqueID of a signed enclave or a description",
        description="Print the UniqueID (hex) of a signed enclave JSON or of a description.",
    )
    p.add_argument("file", metavar="SIGNED_OR_DESC", type=Path)
    p.set_defaults(func=_uniqueid)

    p = cmds.add_parser(
        "signerid",
        help="print the SignerID of a signed enclave",
        description="Print the SignerID (hex) of a signed enclave JSON.",
    )
    p.add_argument("file", metavar="SIGNED", type=Path)
    p.set_defaults(func=_signerid)

    p = cmds.add_parser(
        "keygen",
        help="write a new ECDSA P-256 signer key",
        description="Write a new ECDSA P-256 signer private key (PEM, mode 0600).",
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="key file to create")
    p.set_defaults(func=_keygen)


def register_quote(sub: _Sub[argparse.ArgumentParser]) -> None:
    group = sub.add_parser(
        "quote",
        help="verify SGX quotes",
        description="Verify SGX DCAP quotes (hardware, or simulation when asked).",
    )
    cmds = group.add_subparsers(dest="quote_command", metavar="COMMAND", required=True)
    p = cmds.add_parser(
        "verify",
        help="verify a quote file and print the enclave identity",
        description="Verify QUOTE_FILE (binary, or hex text) and print what it attests. "
        "Exits non-zero naming the failing check.",
    )
    p.add_argument("quote", metavar="QUOTE_FILE", type=Path)
    p.add_argument(
        "--trust",
        choices=("intel", "simulation"),
        action="append",
        help="trust anchor; repeat for both (default: intel only)",
    )
    p.add_argument(
        "--platform",
        type=Path,
        help="simulation platform directory (default: $MESHPROXY_SIM_PLATFORM or "
        "~/.local/share/meshproxy/sim-platform)",
    )
    p.add_argument("--at", metavar="ISO8601", help="verification time (default: now)")
    p.set_defaults(func=_verify)


# -- enclave ---------------------------------------------------------------------------
def _sign(args: argparse.Namespace) -> int:
    desc = load_description(args.description)
    key = _load_key(args.key)
    out: Path = args.output or args.description.with_name(f"{args.description.stem}.signed.json")
    signed = sign_description(desc, key)
    write_signed(signed, out)
    print(f"signed {signed.name!r} -> {out}")
    print(f"UniqueID: {signed.unique_id.hex()}")
    print(f"SignerID: {signed.signer_id.hex()}")
    return 0


def _uniqueid(args: argparse.Namespace) -> int:
    path: Path = args.file
    doc = load_file(path).value
    if isinstance(doc, dict) and "signature" in doc:
        print(load_signed(path).unique_id.hex())
    else:
        print(measure(load_description(path))[0].hex())
    return 0


def _signerid(args: argparse.Namespace) -> int:
    print(load_signed(args.file).signer_id.hex())
    return 0


def _keygen(args: argparse.Namespace) -> int:
    out: Path = args.output
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{out}: exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise UsageError(f"{out}: cannot create: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    print(f"wrote a new P-256 signer key to {out}")
    print(f"SignerID: {signer_id_of(key.public_key()).hex()}")
    return 0


def _load_key(path: Path) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the signer key: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{path}: the signer key is encrypted; give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{path}: not a PEM private key") from None


# -- quote -----------------------------------------------------------------------------
def _verify(args: argparse.Namespace) -> int:
    now = _parse_time(args.at) if args.at else datetime.now(UTC)
    quote = _read_quote(args.quote)
    anchors: list[TrustAnchor] = []
    for name in dict.fromkeys(args.trust or ["intel"]):
        if name == "intel":
            anchors.append(intel_anchor())
        else:
            platform = SimulationPlatform.load(args.platform or default_platform_dir())
            anchors.append(simulation_anchor(platform))
    try:
        verified = verify_quote(quote, anchors, now=now)
    except AttestationError as exc:
        raise AttestationError(
            f"{args.quote}: quote does not verify: {exc}", check=exc.check
        ) from None
    ident = verified.identity
    note = " (SIMULATED: no hardware isolation)" if verified.simulated else ""
    print(f"Verified against the {verified.anchor} trust anchor{note}")
    print(f"UniqueID: {ident.unique_id.hex()}")
    print(f"SignerID: {ident.signer_id.hex()}")
    print(f"ProductID: {ident.product_id}")
    print(f"SecurityVersion: {ident.security_version}")
    print(f"Debug: {str(ident.debug).lower()}")
    print(f"ReportData: {verified.report_data.hex()}")
    print(f"TCBStatus: {verified.tcb_status}")
    return 0


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--at: {text!r} is not an ISO 8601 time") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _read_quote(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    text = b"".join(data.split())
    if text and all(chr(c) in string.hexdigits for c in text):
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass  # odd length: not hex after all
    return data
