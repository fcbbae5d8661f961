"""Options and trust establishment shared by every command that talks to a coordinator.

Trust is established the same way everywhere: ``--root ROOT_PEM``, else the root saved by
``meshproxy manifest verify`` for that coordinator address, else the coordinator's quote
(with ``--accept-simulation`` for a simulated coordinator), verified on the spot. With
``--policy FILE`` the quote is always verified (the saved root is not used) and the
coordinator's enclave identity must satisfy the policy; ``--collateral`` rates a hardware
coordinator's TCB level for it.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from meshproxy.attestation import (
    Collateral,
    CoordinatorPolicy,
    check_coordinator,
    load_coordinator_policy,
    parse_collateral,
)
from meshproxy.coordinator.client import (
    ClientIdentity,
    ClusterEvidence,
    Connection,
    fetch_evidence,
)
from meshproxy.errors import AttestationError, PKIError, PolicyError, UsageError
from meshproxy.pki import cert_from_pem


def add_coordinator_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        required=True,
        metavar="HOST:PORT",
        help="the coordinator's client API (default port 4433)",
    )
    p.add_argument(
        "--root",
        type=Path,
        metavar="ROOT_PEM",
        help="trust this root certificate (default: the one saved by 'manifest verify')",
    )
    p.add_argument(
        "--accept-simulation",
        action="store_true",
        help="trust a coordinator in simulation mode (no hardware isolation)",
    )
    p.add_argument(
        "--platform-dir",
        type=Path,
        metavar="DIR",
        help="simulated platform whose root verifies simulated quotes "
        "(default: $MESHPROXY_SIM_PLATFORM or ~/.local/share/meshproxy/sim-platform)",
    )
    p.add_argument(
        "--policy",
        type=Path,
        metavar="POLICY",
        help="verify the coordinator's quote now (not a saved root) and require this enclave "
        "identity: a coordinator policy file (MarbleRun's coordinator-era.json keys, YAML or "
        "JSON; see 'manifest verify --help')",
    )
    p.add_argument(
        "--collateral",
        type=Path,
        metavar="FILE",
        help="Intel collateral (dcap-qvl JSON) to rate a hardware coordinator's TCB level",
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (10)")


def config_dir() -> Path:
    env = os.environ.get("MESHPROXY_CONFIG_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meshproxy"


def saved_root_path(address: str) -> Path:
    """Where ``manifest verify`` keeps the root of the cluster at ``address``."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", address)
    return config_dir() / "roots" / f"{safe}.pem"


def load_root(path: Path) -> x509.Certificate:
    return cert_from_pem(read_file(path, "--root"), str(path))


def read_collateral(path: Path) -> Collateral:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return parse_collateral(data)
    except AttestationError as exc:
        raise AttestationError(f"{path}: {exc}", check=exc.check) from None


def attest(args: argparse.Namespace) -> tuple[ClusterEvidence, CoordinatorPolicy | None]:
    """Verify the coordinator's quote over a fresh nonce, then its identity (``--policy``)."""
    # Both files are read before anything is fetched: a bad one fails here, named.
    policy = load_coordinator_policy(args.policy) if args.policy is not None else None
    collateral = read_collateral(args.collateral) if args.collateral is not None else None
    evidence = fetch_evidence(
        args.coordinator,
        accept_simulation=args.accept_simulation,
        platform_dir=args.platform_dir,
        timeout=args.timeout,
        collateral=collateral,
    )
    if policy is not None:
        try:
            check_coordinator(evidence.verified, policy)
        except PolicyError as exc:
            raise PolicyError(
                f"coordinator {args.coordinator} refused by policy {args.policy}: {exc}"
            ) from None
    return evidence, policy


def trusted_root(args: argparse.Namespace, *, use_saved: bool = True) -> x509.Certificate:
    """``--root``, else (without ``--policy``) the saved root, else a verified quote's root.
    ``use_saved=False``: never the saved root (a coordinator in recovery mode has another)."""
    attesting = args.policy is not None or args.collateral is not None
    if args.root is not None:
        if attesting:
            raise UsageError(
                "--policy and --collateral check the coordinator's quote, --root trusts a "
                "root without one: give one or the other"
            )
        return load_root(args.root)
    saved = saved_root_path(args.coordinator)
    if use_saved and not attesting and saved.is_file():
        return load_root(saved)
    return attest(args)[0].root


def connect(
    args: argparse.Namespace,
    *,
    identity: ClientIdentity | None = None,
    headers: Mapping[str, str] | None = None,
) -> Connection:
    return Connection(
        args.coordinator, trusted_root(args), args.timeout, identity=identity, headers=headers
    )


def add_user_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``--cert``/``--key``: the manifest user's client certificate and private key."""
    what = "the manifest user's" if required else "a client (the owner's, or a user's)"
    p.add_argument(
        "--cert",
        type=Path,
        required=required,
        metavar="USER_PEM",
        help=f"{what} certificate (PEM)",
    )
    p.add_argument(
        "--key",
        type=Path,
        required=required,
        metavar="USER_KEY",
        help="its private key (PEM, unencrypted); read only by the TLS library",
    )


def user_identity(args: argparse.Namespace) -> ClientIdentity | None:
    """The client identity from ``--cert``/``--key``, checked before any connection."""
    cert_path, key_path = getattr(args, "cert", None), getattr(args, "key", None)
    if cert_path is None and key_path is None:
        return None
    if cert_path is None or key_path is None:
        raise UsageError("--cert and --key go together")
    data = read_file(cert_path, "--cert")
    if not key_path.is_file():
        raise UsageError(f"--key {key_path}: no such file")
    try:
        cert = cert_from_pem(data, f"--cert {cert_path}")
    except PKIError as exc:
        raise UsageError(str(exc)) from None
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise UsageError(
            f"--cert {cert_path} is not valid now (valid "
            f"{cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
            f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
        )
    return ClientIdentity(cert_path, key_path)


def file_name(name: str, what: str) -> str:
    """``name`` as one file name in an output directory: no separators, no ``.``/``..``."""
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"{what} {name!r} cannot be a file name")
    return name


def read_file(path: Path, flag: str = "") -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{flag + ' ' if flag else ''}{path}: {exc.strerror}") from None


def write_output(path: Path | None, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (stdout for None or "-"); ``private`` files
    are created 0600, for secrets and keys."""
    if path is None or str(path) == "-":
        import sys

        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
