"""``meshproxy recover``: unlock a coordinator in recovery mode with a recovery key."""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from meshproxy.cli._common import add_coordinator_options, read_file, trusted_root
from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator import recovery_padding, sign_recovery_secret
from meshproxy.coordinator.client import Connection
from meshproxy.errors import UsageError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "recover",
        help="upload a recovery secret to a coordinator in recovery mode",
        description="Decrypt ENCRYPTED_SECRET_FILE (what 'manifest set' saved for this key) "
        "locally with the recovery key's private key, sign it, and send it to the "
        "coordinator, whose quote is verified first (in recovery mode it serves a temporary "
        "root, so a saved root is not used). With several recovery keys, every holder (or "
        "RecoveryThreshold of them) runs this against the same coordinator.",
    )
    add_coordinator_options(p)
    p.add_argument(
        "--secret",
        type=Path,
        required=True,
        metavar="ENCRYPTED_SECRET_FILE",
        help="the encrypted recovery secret (raw, or base64 as in the JSON map)",
    )
    p.add_argument(
        "--key",
        type=Path,
        required=True,
        metavar="RECOVERY_KEY_PEM",
        help="the recovery key's RSA private key (PEM, unencrypted)",
    )
    p.set_defaults(func=_run)


def _private_key(path: Path) -> rsa.RSAPrivateKey:
    data = read_file(path, "--key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise UsageError(f"--key {path}: not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UsageError(f"--key {path}: a recovery key is an RSA key")
    return key


def decrypt_secret(blob: bytes, key: rsa.RSAPrivateKey, where: str) -> bytes:
    size = key.key_size // 8
    candidates = [blob]
    if len(blob) != size:
        with contextlib.suppress(binascii.Error, ValueError):
            candidates.insert(0, base64.b64decode(blob.strip(), validate=True))
    for ciphertext in candidates:
        if len(ciphertext) != size:
            continue
        try:
            return key.decrypt(ciphertext, recovery_padding())
        except ValueError:
            break
    raise UsageError(
        f"--secret {where}: cannot decrypt it with this key (another key's secret, or not "
        "an encrypted recovery secret)"
    )


def _run(args: argparse.Namespace) -> int:
    key = _private_key(args.key)
    share = decrypt_secret(read_file(args.secret, "--secret"), key, str(args.secret))
    signature = sign_recovery_secret(share, key)
    root = trusted_root(args, use_saved=False)
    data = Connection(args.coordinator, root, args.timeout).request(
        "POST",
        wire.CLIENT_PATHS["recover"],
        {"recoverySecret": wire.b64e(share), "recoverySecretSignature": wire.b64e(signature)},
    )
    remaining = int((data or {}).get("remaining", 0))
    print((data or {}).get("message", ""))
    if remaining:
        print(f"{remaining} more recovery secret(s) needed", file=sys.stderr)
    else:
        print("coordinator recovered", file=sys.stderr)
    return 0
