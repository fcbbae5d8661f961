"""``meshproxy certificate root|intermediate|chain``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshproxy.cli._common import add_coordinator_options, connect, write_output
from meshproxy.coordinator import _wire as wire
from meshproxy.pki import cert_to_pem, certs_from_pem


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "certificate",
        help="get the cluster's root or intermediate certificate",
        description="Print or save the coordinator's certificates, after establishing trust "
        "(pinned root, or the coordinator's verified quote).",
    )
    csub = p.add_subparsers(dest="which", metavar="root|intermediate|chain", required=True)
    for which, text in (
        ("root", "the root CA: stable for the cluster's life; pin it"),
        ("intermediate", "the current intermediate CA: changes with every manifest update"),
        ("chain", "intermediate followed by root"),
    ):
        c = csub.add_parser(which, help=text)
        add_coordinator_options(c)
        c.add_argument("-o", "--output", type=Path, help="write here (default stdout)")
        c.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    conn = connect(args)
    data = conn.request("GET", wire.CLIENT_PATHS["quote"])
    intermediate, _ = certs_from_pem(str(data["cert"]).encode(), "coordinator chain")
    assert conn.root is not None
    pem = {
        "root": cert_to_pem(conn.root),
        "intermediate": cert_to_pem(intermediate),
        "chain": cert_to_pem(intermediate) + cert_to_pem(conn.root),
    }[args.which]
    write_output(args.output, pem)
    return 0
