"""Options and trust establishment shared by every command that talks to a coordinator.

Trust is established the same way everywhere: ``--root ROOT_PEM``, else the root saved by
``meshproxy manifest verify`` for that coordinator address, else the coordinator's quote
(with ``--accept-simulation`` for a simulated coordinator), verified on the spot.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from cryptography import x509

from meshproxy.coordinator.client import Connection, fetch_evidence
from meshproxy.errors import UsageError
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
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--root {path}: {exc.strerror}") from None
    return cert_from_pem(data, str(path))


def trusted_root(args: argparse.Namespace) -> x509.Certificate:
    if args.root is not None:
        return load_root(args.root)
    saved = saved_root_path(args.coordinator)
    if saved.is_file():
        return load_root(saved)
    return fetch_evidence(
        args.coordinator,
        accept_simulation=args.accept_simulation,
        platform_dir=args.platform_dir,
        timeout=args.timeout,
    ).root


def connect(args: argparse.Namespace) -> Connection:
    return Connection(args.coordinator, trusted_root(args), args.timeout)


def write_output(path: Path | None, data: bytes) -> None:
    if path is None or str(path) == "-":
        import sys

        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
