"""``meshproxy run``: the enclave entrypoint (activate, start the app, proxy its traffic)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_DESCRIPTION = """\
Run as the enclave's entrypoint: attest and activate with the coordinator, write the
manifest's Files, start the inbound and outbound listeners, start the app and supervise
it (signals are forwarded, children reaped), and exit with the app's exit status.
The app is the command after '--', else the Argv of the manifest's Parameters."""

_EPILOG = """\
environment of the app (in addition to the proxy's own and the manifest's Env):
  MESHPROXY_INBOUND_<NAME>     Unix socket the app must listen on for inbound NAME;
                               the proxy terminates TLS and relays plaintext to it
  MESHPROXY_OUTBOUND_<NAME>    Unix socket the app connects to for outbound NAME;
                               the proxy originates mTLS to the upstream marble
  MESHPROXY_WORKDIR            the proxy's working directory (sockets, ready.json)
  MESHPROXY_FILES_ROOT         where the manifest's Files were written
                               (manifest path /etc/x -> $MESHPROXY_FILES_ROOT/etc/x)
  MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN  this marble's leaf + intermediate (PEM)
  MARBLE_PREDEFINED_ROOT_CA                   the marbles' trust anchor: the
                                              intermediate (PEM)
  MARBLE_PREDEFINED_COORDINATOR_ROOT_CA       the coordinator's root certificate (PEM)
  MARBLE_PREDEFINED_PRIVATE_KEY               this marble's private key (PKCS#8 PEM)

readiness: <workdir>/ready.json lists the bound addresses, sockets and the app's pid;
GET /live and /ready answer on the admin Unix socket (default <workdir>/admin.sock).

example:
  meshproxy run --config backend.yaml -- python3 backend.py"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run as an enclave's entrypoint: activate, start and proxy the app",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", required=True, type=Path, metavar="FILE", help="the marble config (YAML)"
    )
    p.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- APP ARGV...",
        help="the app to start (default: the manifest's Argv)",
    )
    p.set_defaults(func=_run)


def app_argv(raw: list[str]) -> list[str]:
    """The app's command line: everything after the first ``--``."""
    return raw[1:] if raw[:1] == ["--"] else raw


# Modules both the proxy and the attestation agent load: imported once, before the fork,
# instead of once in each process after it (the two share one CPU on a small node). Only
# these: the agent's own (cryptography, attestation, the coordinator client) stay out of
# the long-lived proxy, and the proxy's own (PyYAML for the config file, asyncio, uvloop,
# the data plane) come after the fork, while the agent attests.
_SHARED = ("ctypes", "ssl", "meshproxy.config", "meshproxy._log")


def _run(args: argparse.Namespace) -> int:
    import gc
    import importlib

    # No cyclic garbage collection while starting: every object made now lives as long as
    # the process, and scanning them again and again was ~10 % of a start's CPU. The agent
    # (a fork) exits when it has attested; the proxy collects again once it serves
    # (runtime._main.serve).
    gc.disable()
    try:
        for name in _SHARED:
            importlib.import_module(name)
        # The attestation agent starts first: it loads what it attests with while this
        # process parses the config (PyYAML is loaded here only), which it then hands to
        # the agent, and loads the data plane's modules (meshproxy.runtime._agent).
        from meshproxy.runtime._agent import begin_activation

        pending = begin_activation(args.config)
        try:
            from meshproxy._log import setup as setup_logging
            from meshproxy.config._marble import load_marble_document

            cfg, document = load_marble_document(args.config)
            setup_logging(cfg.log.level, cfg.log.format)
            pending.configure(cfg, document)
        except BaseException:
            pending.cancel()
            raise
        from meshproxy.runtime import run

        return run(args.config, app_argv(list(args.argv)), pending=pending, cfg=cfg)
    finally:
        gc.enable()
