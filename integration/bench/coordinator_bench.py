"""Coordinator scenario: activations per second, activation latency, marble start-to-ready.

    .venv/bin/python -m integration.bench.coordinator_bench [--activations 400]
        [--concurrency 8] [--ready-samples 3] [--json results-coordinator.json]

A simulated coordinator (pinned to CPU 1 when there are two or more CPUs) gets a manifest
with two marble types: ``counted`` (MaxActivations, so every activation is a sealed,
fsynced commit before the answer) and ``free`` (unlimited, two certificate secrets issued
per activation). Load processes on CPU 0 activate like ``meshproxy run`` does (fresh key,
nonce, simulated quote bound to both, CSR; the root is pinned, as after ``manifest
verify``), each one at a time, ``--concurrency`` of them at once. Start-to-ready is the
wall time from spawning ``meshproxy run`` (measure, attest, activate, write files, start
listeners and the app) to its ``ready.json``. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from cryptography import x509

from integration.harness import Cluster
from meshproxy.attestation import SimulationPlatform, SimulationProvider
from meshproxy.coordinator import client
from meshproxy.pki import generate_key


def _pin(cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {cpu})


def _worker(args: tuple[str, bytes, str, str, int, str, int]) -> list[float]:
    mesh, root_pem, platform_dir, identity_json, count, marble_type, cpu = args
    _pin(cpu)
    from meshproxy.attestation import EnclaveIdentity

    doc = json.loads(identity_json)
    ident = EnclaveIdentity(
        unique_id=bytes.fromhex(doc["unique_id"]),
        signer_id=bytes.fromhex(doc["signer_id"]),
        product_id=int(doc["product_id"]),
        security_version=int(doc["security_version"]),
        debug=bool(doc["debug"]),
    )
    platform = SimulationPlatform.load(Path(platform_dir))
    provider = SimulationProvider(platform, ident)
    root = x509.load_pem_x509_certificate(root_pem)
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        client.activate(
            mesh,
            marble_type=marble_type,
            instance=uuid.uuid4(),
            key=generate_key(),
            dns_names=["bench.test"],
            provider=provider,
            root=root,
            accept_simulation=True,
            platform_dir=None,
        )
        latencies.append(time.perf_counter() - start)
    return latencies


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def run(activations: int, concurrency: int, ready_samples: int) -> dict[str, Any]:
    import hashlib

    from integration.conftest import Mesh, Signer

    base = Path(tempfile.mkdtemp(prefix="meshproxy-coordinator-bench-"))
    results: dict[str, Any] = {"activations": activations, "concurrency": concurrency}
    with Cluster(base) as c:
        c.start_coordinator()
        _pin_process(c.procs[0].popen.pid, 1)
        signer_key = base / "signer.pem"
        c.cli("enclave", "keygen", "-o", str(signer_key))
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_private_key(signer_key.read_bytes(), None)
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        signer = Signer(signer_key, hashlib.sha256(spki).hexdigest())
        mesh = Mesh(c, signer)
        pkg = {"SignerID": signer.signer_id, "ProductID": 1, "SecurityVersion": 1}
        mesh.set_manifest(
            {
                "Packages": {"p": pkg},
                "Marbles": {
                    "counted": {"Package": "p", "MaxActivations": 10 * activations + 100},
                    "free": {
                        "Package": "p",
                        "Parameters": {
                            "Files": {
                                "/a.pem": "{{ pem .Secrets.a.Cert }}",
                                "/b.pem": "{{ pem .Secrets.b.Cert }}",
                            }
                        },
                    },
                    "ready": {"Package": "p"},
                },
                "Secrets": {
                    "a": {"Type": "cert-ecdsa", "Size": 256},
                    "b": {"Type": "cert-ed25519"},
                },
            }
        )
        platform_dir = c.base / "sim-platform"
        root = client.fetch_evidence(
            c.client_addr, accept_simulation=True, platform_dir=platform_dir
        ).root
        from meshproxy.pki import cert_to_pem

        ident = {
            "unique_id": hashlib.sha256(b"bench").hexdigest(),
            "signer_id": signer.signer_id,
            "product_id": 1,
            "security_version": 1,
            "debug": False,
        }
        per = max(activations // concurrency, 1)
        for marble_type in ("counted", "free"):
            jobs = [
                (c.mesh_addr, cert_to_pem(root), str(platform_dir), json.dumps(ident), per,
                 marble_type, 0)
                for _ in range(concurrency)
            ]  # fmt: skip
            start = time.perf_counter()
            with multiprocessing.get_context("fork").Pool(concurrency) as pool:
                latencies = [x for chunk in pool.map(_worker, jobs) for x in chunk]
            wall = time.perf_counter() - start
            results[marble_type] = {
                "activations_per_s": round(len(latencies) / wall, 1),
                "p50_ms": round(statistics.median(latencies) * 1000, 1),
                "p99_ms": round(_percentile(latencies, 99) * 1000, 1),
                "n": len(latencies),
            }
        ready = []
        for i in range(ready_samples):
            cfg = mesh.marble_config(
                f"r{i}", "ready", app=[sys.executable, "-c", "import time; time.sleep(30)"]
            )
            start = time.perf_counter()
            proc = mesh.start(f"r{i}", cfg, [sys.executable, "-c", "import time; time.sleep(30)"])
            ready.append(time.perf_counter() - start)
            proc.stop()
        if ready:
            results["start_to_ready_ms"] = {
                "median": round(statistics.median(ready) * 1000, 1),
                "max": round(max(ready) * 1000, 1),
                "n": len(ready),
            }
    return results


def _pin_process(pid: int, cpu: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coordinator_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--activations", type=int, default=400, help="per marble type (400)")
    p.add_argument("--concurrency", type=int, default=8, help="simultaneous marbles (8)")
    p.add_argument("--ready-samples", type=int, default=3, help="marble starts timed (3)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    _pin(0)
    results = run(args.activations, args.concurrency, args.ready_samples)
    print(f"{'scenario':<34}{'act/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, text in (("counted", "activation, MaxActivations commit"),
                       ("free", "activation, 2 cert secrets")):  # fmt: skip
        r = results[name]
        print(f"{text:<34}{r['activations_per_s']:>9}{r['p50_ms']:>9}{r['p99_ms']:>9}")
    if "start_to_ready_ms" in results:
        r = results["start_to_ready_ms"]
        print(f"marble start-to-ready: median {r['median']} ms, max {r['max']} ms (n={r['n']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
