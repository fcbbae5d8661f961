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
        "serves the manifest and its own quote, users' secrets and updates. Several replicas "
        "share state with --store etcd; a new replica gets the state key from an attested "
        "peer. Inside an SGX enclave it quotes with --attestation gramine|occlum; without "
        "SGX, --simulation. Runs until SIGTERM.",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="where sealed state is kept (--store file) and endpoints.json is written",
    )
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
        help="run without SGX: simulated quotes, marked in every certificate and status "
        "(the same as --attestation simulation)",
    )
    p.add_argument(
        "--attestation",
        choices=["simulation", "gramine", "occlum"],
        help="who makes the coordinator's quotes: the simulated platform (--simulation), "
        "Gramine's /dev/attestation or Occlum's /dev/sgx inside an SGX enclave; required "
        "without --simulation",
    )
    p.add_argument("--platform-dir", type=Path, metavar="DIR", help="simulated platform directory")
    p.add_argument(
        "--seal",
        choices=["simulation", "gramine", "none"],
        help="who seals the state key: the simulated platform (default with --simulation), "
        "Gramine's SGX sealing keys (default otherwise; the manifest's Config.SealMode picks "
        "_sgx_mrsigner for ProductKey, _sgx_mrenclave for UniqueKey), or none (the key only "
        "in memory and the recovery secrets: every restart enters recovery mode)",
    )
    p.add_argument(
        "--device-dir",
        type=Path,
        metavar="DIR",
        help="stands in for /dev (tests): --attestation gramine quotes through "
        "DIR/attestation/, --attestation occlum through DIR/sgx, --seal gramine reads "
        "DIR/attestation/keys/_sgx_mr*",
    )
    p.add_argument(
        "--trust-sim-platform",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="also accept quotes of this simulated machine (marbles rescheduled there, peer "
        "replicas); repeatable",
    )
    p.add_argument(
        "--store",
        choices=["file", "etcd"],
        default="file",
        help="where sealed state lives: a file in --state-dir (default), or etcd, shared by "
        "several coordinator replicas",
    )
    p.add_argument(
        "--etcd-endpoints",
        default="",
        metavar="URL,...",
        help="etcd client URLs for --store etcd (e.g. http://127.0.0.1:2379)",
    )
    p.add_argument("--etcd-prefix", default="/meshproxy/", help="etcd key prefix (/meshproxy/)")
    p.add_argument(
        "--etcd-ca",
        type=Path,
        metavar="PEM",
        help="CA certificate(s) that sign etcd's server certificate (https:// endpoints; "
        "default: the system's CAs)",
    )
    p.add_argument(
        "--etcd-cert",
        type=Path,
        metavar="PEM",
        help="client certificate for etcd (with --etcd-key)",
    )
    p.add_argument("--etcd-key", type=Path, metavar="PEM", help="private key of --etcd-cert")
    p.add_argument(
        "--advertise",
        metavar="HOST:PORT",
        help="the mesh address peer replicas reach this one at (default: the bound address)",
    )
    owner = p.add_argument_group(
        "owner", "who may set the first manifest (default: whoever comes first)"
    )
    owner.add_argument(
        "--owner-cert",
        type=Path,
        metavar="PEM",
        help="the first 'manifest set' must present this client certificate",
    )
    owner.add_argument(
        "--owner-token-file",
        type=Path,
        metavar="FILE",
        help="the first 'manifest set' must present the token in FILE (--owner-token)",
    )
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

    endpoints = tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip())
    if args.store == "etcd" and not endpoints:
        raise UsageError("--store etcd needs --etcd-endpoints URL[,URL...]")
    if args.store != "etcd" and endpoints:
        raise UsageError("--etcd-endpoints is only for --store etcd")
    tls_files = {"--etcd-ca": args.etcd_ca, "--etcd-cert": args.etcd_cert,
                 "--etcd-key": args.etcd_key}  # fmt: skip
    given = [flag for flag, path in tls_files.items() if path is not None]
    if given and args.store != "etcd":
        raise UsageError(f"{', '.join(given)}: only for --store etcd")
    if (args.etcd_cert is None) != (args.etcd_key is None):
        raise UsageError("--etcd-cert and --etcd-key go together: give both or neither")
    for flag in given:
        if not tls_files[flag].is_file():
            raise UsageError(f"{flag} {tls_files[flag]}: no such file")
    if args.advertise is not None:
        _addr(args.advertise, "--advertise")
    attestation, seal = _attestation(args)
    return run(
        Options(
            state_dir=args.state_dir,
            client_addr=_addr(args.client_addr, "--client-addr"),
            mesh_addr=_addr(args.mesh_addr, "--mesh-addr"),
            dns_names=tuple(args.dns_name),
            simulation=attestation == "simulation",
            platform_dir=args.platform_dir,
            log_level=args.log_level,
            log_format=args.log_format,
            store=args.store,
            etcd_endpoints=endpoints,
            etcd_ca=args.etcd_ca,
            etcd_cert=args.etcd_cert,
            etcd_key=args.etcd_key,
            etcd_prefix=args.etcd_prefix,
            owner_cert=args.owner_cert,
            owner_token_file=args.owner_token_file,
            trust_platforms=tuple(args.trust_sim_platform),
            advertise=args.advertise,
            seal=seal,
            device_dir=args.device_dir,
            attestation=attestation,
        )
    )


def _attestation(args: argparse.Namespace) -> tuple[str, str]:
    """``--attestation`` (``--simulation`` spells its simulation choice) and ``--seal``,
    checked against each other and ``--device-dir`` before anything starts."""
    if args.simulation and args.attestation not in (None, "simulation"):
        raise UsageError(
            f"--simulation contradicts --attestation {args.attestation}: --simulation means "
            "simulated quotes; give one of them"
        )
    attestation = "simulation" if args.simulation else args.attestation
    simulated = attestation == "simulation"
    if not simulated:
        for flag, given in (("--platform-dir", args.platform_dir),
                            ("--trust-sim-platform", args.trust_sim_platform)):  # fmt: skip
            if given:
                raise UsageError(f"{flag} is only for --simulation (a simulated platform)")
    if args.seal is None and attestation == "occlum":
        raise UsageError(
            "--attestation occlum: meshproxy has no Occlum sealer; pass --seal none (the state "
            "key stays in memory and the recovery secrets: every restart enters recovery mode)"
        )
    seal = args.seal or ("simulation" if simulated else "gramine")
    if seal == "simulation" and not simulated:
        raise UsageError("--seal simulation needs --simulation (a simulated platform)")
    if seal == "gramine" and attestation == "occlum":
        raise UsageError("--seal gramine needs Gramine's keys: with --attestation occlum pass "
                         "--seal none")  # fmt: skip
    if args.device_dir is not None and seal != "gramine" and attestation in (None, "simulation"):
        raise UsageError("--device-dir is only for --seal gramine or --attestation gramine|occlum")
    if attestation is None:
        from meshproxy.coordinator._server import NO_PROVIDER

        raise UsageError(NO_PROVIDER)
    if not simulated:
        dev = args.device_dir or Path("/dev")
        device = dev / ("attestation" if attestation == "gramine" else "sgx")
        if not device.exists():
            runtime = "gramine-sgx" if attestation == "gramine" else "occlum run"
            raise UsageError(
                f"--attestation {attestation}: {device} does not exist, so this is not an "
                f"enclave started by {runtime}; pass --simulation to run without SGX"
            )
    return attestation, seal
