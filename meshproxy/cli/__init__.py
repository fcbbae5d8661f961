"""The ``meshproxy`` command.

Each command group lives in its own module with ``register(subparsers)``; a handler takes
the parsed arguments and returns the exit status. A ``MeshError`` becomes one line on
stderr and its ``exit_code``; any other exception is a bug and says so.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meshproxy import __version__
from meshproxy.errors import MeshError

_GROUPS = (
    "meshproxy.cli.coordinator",
    "meshproxy.cli.manifest",
    "meshproxy.cli.certificate",
    "meshproxy.cli.status",
    "meshproxy.cli.run",
    "meshproxy.cli.enclave",
    "meshproxy.cli.quote",
    "meshproxy.cli.secret",
    "meshproxy.cli.recover",
)
_RUN = ("meshproxy.cli.run",)


def build_parser(groups: Sequence[str] = _GROUPS) -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="meshproxy",
        description="A confidential service mesh: coordinator, in-enclave mTLS proxy, CLI.",
    )
    parser.add_argument("--version", action="version", version=f"meshproxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in groups:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # `meshproxy run` is the long-lived proxy: it must not load the other commands'
    # modules (the coordinator's client and web stack), which would stay in its memory.
    parser = build_parser(_RUN if words[:1] == ["run"] else _GROUPS)
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except MeshError as exc:
        print(f"meshproxy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug: say so, with the traceback, and a distinct status
        logging.getLogger("meshproxy").exception("internal error")
        print("meshproxy: internal error (this is a bug; the traceback is above)", file=sys.stderr)
        return 70
    return status


if __name__ == "__main__":
    sys.exit(main())
