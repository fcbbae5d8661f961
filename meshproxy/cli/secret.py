"""``meshproxy secret get|set``: read and write the manifest's secrets as a user."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshproxy.cli._common import (
    add_coordinator_options,
    add_user_options,
    connect,
    file_name,
    read_file,
    user_identity,
    write_output,
)
from meshproxy.coordinator import _wire as wire
from meshproxy.errors import ConnectError, UsageError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "secret",
        help="read or write secrets (as a manifest user)",
        description="Read shared and user-defined secrets (role with ReadSecret) or write "
        "user-defined ones (WriteSecret), authenticated by the user's client certificate.",
    )
    ssub = p.add_subparsers(dest="secret_command", metavar="SUBCOMMAND", required=True)

    g = ssub.add_parser(
        "get",
        help="read secrets",
        description="Read the secrets NAME... Without -o, print them as JSON (MarbleRun's "
        "shape: Type, Size, Cert, Private, Public, ... in base64). With -o DIR, write each "
        "to DIR: NAME (the key or plain value), or NAME.crt and NAME.key (PEM, 0600) for "
        "certificate secrets.",
    )
    g.add_argument("names", nargs="+", metavar="NAME")
    add_coordinator_options(g)
    add_user_options(g)
    g.add_argument("-o", "--output", type=Path, metavar="DIR", help="write files into DIR")
    g.set_defaults(func=_get)

    s = ssub.add_parser(
        "set",
        help="write a user-defined secret",
        description="Set the user-defined secret NAME. A symmetric-key or plain secret takes "
        "the bytes of --from-file or the text of --value. A certificate secret takes a PEM "
        "file with the certificate and, optionally, its private key.",
    )
    s.add_argument("name", metavar="NAME")
    add_coordinator_options(s)
    add_user_options(s)
    source = s.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-file", type=Path, metavar="FILE", help="the value's bytes")
    source.add_argument("--value", metavar="TEXT", help="the value as text (UTF-8)")
    s.set_defaults(func=_set)


def _get(args: argparse.Namespace) -> int:
    identity = user_identity(args)
    query = "&".join(f"s={_quote(n)}" for n in args.names)
    data = connect(args, identity=identity).request(
        "GET", f"{wire.CLIENT_PATHS['secrets']}?{query}"
    )
    secrets = (data or {}).get("secrets")
    if not isinstance(secrets, dict):
        raise ConnectError(f"coordinator {args.coordinator} sent a malformed secrets answer")
    if args.output is None:
        json.dump(secrets, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    for name, secret in sorted(secrets.items()):
        for path in _write_secret(args.output, name, secret):
            print(f"{name}: written to {path}", file=sys.stderr)
    return 0


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _write_secret(directory: Path, name: str, secret: dict[str, Any]) -> list[Path]:
    file_name(name, "secret name")

    def raw(field: str) -> bytes | None:
        value = secret.get(field)
        return base64.b64decode(value) if isinstance(value, str) else None

    cert, private = raw("Cert"), raw("Private")
    if cert is None:
        value = raw("Public") or raw("Private") or b""
        path = directory / name
        write_output(path, value, private=True)
        return [path]
    crt = directory / f"{name}.crt"
    pem = x509.load_der_x509_certificate(cert).public_bytes(serialization.Encoding.PEM)
    write_output(crt, pem)
    paths = [crt]
    if private is not None:
        key = serialization.load_der_private_key(private, password=None)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_output(directory / f"{name}.key", key_pem, private=True)
        paths.append(directory / f"{name}.key")
    return paths


def _set(args: argparse.Namespace) -> int:
    identity = user_identity(args)
    if args.value is not None:
        value = args.value.encode()
    else:
        value = read_file(args.from_file, "--from-file")
    upload = _upload(value)
    connect(args, identity=identity).request(
        "POST", wire.CLIENT_PATHS["secrets"], {"secrets": {args.name: upload}}
    )
    print(f"secret {args.name!r} set", file=sys.stderr)
    return 0


def _upload(value: bytes) -> dict[str, str]:
    """A PEM certificate (with an optional key) becomes Cert/Private; anything else Key."""
    if b"-----BEGIN CERTIFICATE-----" not in value:
        return {"Key": wire.b64e(value)}
    try:
        cert = x509.load_pem_x509_certificates(value)[0]
    except ValueError:
        raise UsageError("the value has a PEM certificate block that does not parse") from None
    out = {"Cert": wire.b64e(cert.public_bytes(serialization.Encoding.DER))}
    if b"PRIVATE KEY-----" in value:
        try:
            key = serialization.load_pem_private_key(value, password=None)
        except (ValueError, TypeError):
            raise UsageError("the value's private key does not load (PEM, unencrypted)") from None
        out["Private"] = wire.b64e(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return out
