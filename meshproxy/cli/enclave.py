"""``meshproxy enclave ...`` (sign descriptions, show identities, make signer keys, write
Gramine and Occlum templates) and ``meshproxy quote verify`` (check a quote file against
Intel or the simulation root, optionally rating it by Intel collateral)."""

from __future__ import annotations

import argparse
import binascii
import json
import os
import string
import struct
import sys
import sysconfig
from datetime import UTC, datetime
from pathlib import Path

import yaml
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshproxy.attestation import (
    Runtime,
    SimulationPlatform,
    TrustAnchor,
    default_platform_dir,
    gramine_manifest,
    intel_anchor,
    load_description,
    load_signed,
    measure,
    occlum_bom,
    occlum_config,
    sign_description,
    signer_id_of,
    simulation_anchor,
    verify_quote,
    verify_ratls_certificate,
    verify_tdx_quote,
    write_signed,
)
from meshproxy.cli._common import read_collateral
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

    p = cmds.add_parser(
        "gramine-manifest",
        help="write a Gramine manifest template for an enclave description",
        description="Write a Gramine manifest template (TOML, for gramine-manifest and "
        "gramine-sgx-sign) that runs `python -m meshproxy run --config CONFIG` with this "
        "interpreter and meshproxy, and trusts (measures) the description's files.",
    )
    _template_arguments(p)
    p.add_argument("--enclave-size", default="1G", help="sgx.enclave_size (default: 1G)")
    p.add_argument("--max-threads", type=int, default=32, help="sgx.max_threads (default: 32)")
    p.set_defaults(func=_gramine_manifest)

    p = cmds.add_parser(
        "occlum-config",
        help="write an Occlum.json template (and its copy_bom) for an enclave description",
        description="Write an Occlum.json template; with --bom, also the copy_bom YAML "
        "that puts the description's files, this interpreter and meshproxy into the image.",
    )
    _template_arguments(p)
    p.add_argument("--bom", type=Path, help="also write the copy_bom YAML here")
    p.add_argument("--user-space-size", default="1024MB", help="default: 1024MB")
    p.add_argument("--max-threads", type=int, default=64, help="default: 64")
    p.set_defaults(func=_occlum_config)


def _template_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("description", metavar="DESC", type=Path, help="enclave description (YAML)")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    p.add_argument(
        "--config",
        default="marble.yaml",
        help="the marble config, one of the description's files (default: marble.yaml)",
    )
    p.add_argument(
        "--env-passthrough",
        metavar="NAME",
        action="append",
        default=[],
        help="let the host set this environment variable (repeatable; default: none)",
    )


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
        "QUOTE_FILE may also be an RA-TLS certificate (PEM or DER: a marble's leaf, or "
        "Gramine's or the Intel SDK's): then the quote in its evidence extension is "
        "verified and must bind the certificate's key. Exits non-zero naming the failing "
        "check.",
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
    p.add_argument(
        "--at",
        metavar="TIME",
        help="verification time: ISO 8601, or seconds since the epoch (default: now)",
    )
    p.add_argument(
        "--collateral",
        type=Path,
        metavar="FILE",
        help="Intel collateral (dcap-qvl JSON) to rate the platform's TCB level by",
    )
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


# -- templates -------------------------------------------------------------------------
def _runtime() -> Runtime:
    import meshproxy

    paths = sysconfig.get_paths()
    dirs = dict.fromkeys(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    return Runtime(
        python=sys.executable,
        python_dirs=tuple(d for d in dirs if Path(d).is_dir()),
        package_dir=str(Path(meshproxy.__file__).parent),
        arch_libdir=f"/lib/{multiarch}",
    )


def _write_output(text: str, output: Path | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text)
    except OSError as exc:
        raise UsageError(f"{output}: cannot write: {exc.strerror}") from None
    print(f"wrote {output}", file=sys.stderr)


def _gramine_manifest(args: argparse.Namespace) -> int:
    desc = load_description(args.description)
    text = gramine_manifest(
        desc,
        _runtime(),
        config=args.config,
        enclave_size=args.enclave_size,
        max_threads=args.max_threads,
        env_passthrough=args.env_passthrough,
    )
    _write_output(text, args.output)
    return 0


def _occlum_config(args: argparse.Namespace) -> int:
    desc = load_description(args.description)
    config = occlum_config(
        desc,
        config=args.config,
        user_space_size=args.user_space_size,
        max_threads=args.max_threads,
        env_passthrough=args.env_passthrough,
    )
    _write_output(json.dumps(config, indent=2) + "\n", args.output)
    if args.bom is not None:
        bom = occlum_bom(desc, _runtime())
        _write_output(yaml.safe_dump(bom, sort_keys=False), args.bom)
    return 0


# -- quote -----------------------------------------------------------------------------
_TEE_TDX = 0x81


def _verify(args: argparse.Namespace) -> int:
    now = _parse_time(args.at) if args.at else datetime.now(UTC)
    quote = _read_quote(args.quote)
    collateral = read_collateral(args.collateral) if args.collateral else None
    anchors: list[TrustAnchor] = []
    for name in dict.fromkeys(args.trust or ["intel"]):
        if name == "intel":
            anchors.append(intel_anchor())
        else:
            platform = SimulationPlatform.load(args.platform or default_platform_dir())
            anchors.append(simulation_anchor(platform))
    certificate = quote.lstrip().startswith(b"-----BEGIN CERTIFICATE-----") or quote[:1] == b"\x30"
    if certificate:
        try:
            verified = verify_ratls_certificate(quote, anchors, now=now, collateral=collateral)
        except AttestationError as exc:
            raise AttestationError(
                f"{args.quote}: RA-TLS certificate does not verify: {exc}", check=exc.check
            ) from None
        print("RA-TLS certificate: its quote verifies and binds the certificate's key")
    elif len(quote) >= 8 and struct.unpack_from("<I", quote, 4)[0] == _TEE_TDX:
        if collateral is not None:
            raise UsageError("--collateral: TDX TCB levels are not evaluated (SGX only)")
        return _verify_tdx(args.quote, quote, anchors, now)
    else:
        try:
            verified = verify_quote(quote, anchors, now=now, collateral=collateral)
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
    print(f"Advisories: {', '.join(verified.advisories) or 'none'}")
    return 0


def _verify_tdx(path: Path, quote: bytes, anchors: list[TrustAnchor], now: datetime) -> int:
    try:
        v = verify_tdx_quote(quote, anchors, now=now)
    except AttestationError as exc:
        raise AttestationError(f"{path}: quote does not verify: {exc}", check=exc.check) from None
    print(f"Verified TDX quote (v{v.version}) against the {v.anchor} trust anchor")
    print(f"MRTD: {v.mr_td.hex()}")
    for i, rtmr in enumerate(v.rtmrs):
        print(f"RTMR{i}: {rtmr.hex()}")
    print(f"MRCONFIGID: {v.mr_config_id.hex()}")
    print(f"MRSEAM: {v.mr_seam.hex()}")
    print(f"Debug: {str(v.debug).lower()}")
    print(f"ReportData: {v.report_data.hex()}")
    print(f"TCBStatus: {v.tcb_status}")
    return 0


def _parse_time(text: str) -> datetime:
    if text.isdigit():
        try:
            return datetime.fromtimestamp(int(text), UTC)
        except (OverflowError, ValueError, OSError):
            raise UsageError(f"--at: {text} seconds since the epoch is out of range") from None
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
