"""``meshproxy status``."""

from __future__ import annotations

import argparse
from typing import Any

from meshproxy.cli._common import add_coordinator_options, connect
from meshproxy.coordinator import _wire as wire


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "status", help="show the coordinator's state", description="Show the coordinator's state."
    )
    add_coordinator_options(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    data = connect(args).request("GET", wire.CLIENT_PATHS["status"])
    print(f"{data['code']}: {data['message']}")
    return 0
