"""``meshproxy coordinator``: run a coordinator until SIGTERM."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from meshproxy.coordinator.client import parse_address
from meshproxy.errors import ConnectError, UsageError


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "coordinator",
        help="run a coordinator",
        description="Run a coordinator: it attests marbles, issues their certificates, "
        "serves the manifest and its own quote. Runs until SIGTERM.",
    )
    p.add_argument("--state-dir", type=Path, required=True, help="where sealed state is kept")
    p.add_argument("--client-addr", default=":4433", metavar="HOST:PORT", help="client API (:4433)")
    p.add_argument("--mesh-addr", default=":2001", metavar="HOST:PORT", help="mesh API (:2001)")
    p.add_argument(
        "--dns-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP of the coordinator for its certificate (repeatable)",
    )
    p.add_argument(
        "--simulation",
        action="store_true",
        help="run without SGX: simulated quotes, marked in every certificate and status",
    )
    p.add_argument("--platform-dir", type=Path, metavar="DIR", help="simulated platform directory")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "text"])
    p.set_defaults(func=_run)


def _addr(text: str, flag: str) -> tuple[str, int]:
    try:
        host, port = parse_address(text if ":" in text else f"{text}:", flag)
    except ConnectError as exc:
        raise UsageError(str(exc)) from None
    return ("" if text.startswith(":") else host), port


def _run(args: argparse.Namespace) -> int:
    from meshproxy.coordinator._server import Options, run

    return run(
        Options(
            state_dir=args.state_dir,
            client_addr=_addr(args.client_addr, "--client-addr"),
            mesh_addr=_addr(args.mesh_addr, "--mesh-addr"),
            dns_names=tuple(args.dns_name),
            simulation=args.simulation,
            platform_dir=args.platform_dir,
            log_level=args.log_level,
            log_format=args.log_format,
        )
    )
