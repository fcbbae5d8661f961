"""Coordinator scenario: activations per second (wall and per coordinator CPU-second),
activation latency under load, marble start-to-ready.

    .venv/bin/python -m integration.bench.coordinator_bench [--activations 1500]
        [--concurrency 16] [--rate 250 --rate 400 --rate 450] [--ready-samples 5]
        [--only plain|counted|secrets ...] [--json results-coordinator.json]

A simulated coordinator runs pinned to CPU 1 (every thread of it) and gets a manifest with
three marble types: ``plain`` (no secrets, unlimited), ``counted`` (MaxActivations, so
every activation is a sealed, fsynced commit before its answer) and ``secrets`` (two
certificate secrets issued per activation). The load generator runs pinned to CPU 0: one
uvloop event loop with ``--concurrency`` simulated marbles activating at once, each
activation with its own key, CSR, quote and TLS connection, doing on the wire what
``meshproxy run`` does (``client.activate``): a TLS connection pinned to the root, ``POST
marble/nonce``, a simulated quote binding the key and that nonce, ``POST marble/activate``
on the same connection. Keys, CSRs and UUIDs are made before the clock starts (they do
not depend on the nonce); the quote is made per activation, inside the measurement. The
client does not re-verify the chain it gets (that is the marble's cost, not the
coordinator's).

Figures per scenario: activations per wall second; per coordinator CPU-second (utime +
stime of the coordinator process from /proc, all threads), split into its event loop
(TLS, HTTP, JSON: "loop ms") and its other threads (the core's worker: attestation,
issuance, sealing and writing the state: "core ms"), each in CPU ms per activation; the
coordinator's CPU use
(1.0 = one core busy) and what other processes took of that CPU meanwhile ("others":
if high, wall figures mean little, per-CPU-second ones still hold); the load generator's
CPU milliseconds per activation (if that times the rate nears 1.0, the load generator is
the bottleneck, and the table says so);
p50/p99 latency from connect to the parsed answer. The scenarios run closed-loop (each
marble starts its next activation when one is answered: saturation). A closed loop's
latency is bound by its throughput (Little's law: mean latency = concurrency / rate, so
16 marbles at 500/s wait 32 ms on average whatever the coordinator does), so each
``--rate`` then starts plain activations at that fixed rate whatever the answers do, for
4 s: latency under a steady load below saturation (defaults 250, 400 and 450/s: half the
500/s target and near it). Start-to-ready is the wall time from
spawning ``meshproxy run`` (measure, attest, activate, write files, start listeners and
the app) to its ``ready.json`` (checked every millisecond; meshproxy's bytecode written
first, as a wheel install has it), with the marble on the load's
CPU alone and then on both CPUs, and the median time after the spawn of each step the
marble logs on the way. Numbers on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from integration.harness import Cluster, marble_workdir
from meshproxy.attestation import EnclaveIdentity, SimulationPlatform, SimulationProvider
from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator import client
from meshproxy.coordinator._core import report_data_for
from meshproxy.pki import cert_to_pem, generate_key, make_csr, public_der

SCENARIOS = {
    "plain": "activation, no secrets",
    "counted": "activation, MaxActivations commit",
    "secrets": "activation, 2 cert secrets",
}
COORDINATOR_CPU, LOAD_CPU = 1, 0
DEFAULT_RATES = [250.0, 400.0, 450.0]  # open-loop offered rates (per second)


def _two_cpus() -> bool:
    return hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` (threads made later inherit the mask)."""
    if not _two_cpus():
        return
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {cpu})
        except (ProcessLookupError, PermissionError):
            continue


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loop_cpu_seconds(pid: int) -> float:
    """utime + stime of the process's main thread (the coordinator's event loop)."""
    try:
        fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_busy_seconds(cpu: int) -> float:
    """Time CPU ``cpu`` was not idle (all processes, and time stolen by the hypervisor)."""
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == f"cpu{cpu}":
            ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
            return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


# Where an activation's time goes, as the load generator sees it: TCP + TLS handshake, the
# nonce request, making the quote (the generator's own CPU), the activation request.
PHASES = ("connect_tls", "nonce", "quote", "activate")


def _slowest(load: Load) -> list[tuple[float, ...]]:
    cut = _percentile(load.latencies, 99)
    return [p for lat, p in zip(load.latencies, load.phases, strict=True) if lat >= cut]


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- the load generator ---------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedMarble:
    public_der: bytes
    body: dict[str, str]  # the activation request without nonce and quote


@dataclass
class Load:
    host: str
    port: int
    ctx: ssl.SSLContext
    provider: SimulationProvider
    marbles: list[PreparedMarble]
    latencies: list[float] = field(default_factory=list)
    # per activation: seconds in each of PHASES (where the time of a slow one went)
    phases: list[tuple[float, ...]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def prepare(marble_type: str, n: int) -> list[PreparedMarble]:
    out = []
    for _ in range(n):
        key = generate_key()
        csr = make_csr(key, marble_type, ["bench.test"])
        body = {
            "marbleType": marble_type,
            "uuid": str(uuid.uuid4()),
            "csr": csr.public_bytes(Encoding.PEM).decode(),
        }
        out.append(PreparedMarble(public_der(key), body))
    return out


async def _post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: dict[str, Any]
) -> Any:
    payload = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: coordinator\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    doc = json.loads(await reader.readexactly(length))
    if status != 200 or doc.get("status") != "success":
        raise RuntimeError(f"{path}: HTTP {status}: {doc.get('message')}")
    return doc["data"]


async def _activate_one(load: Load, marble: PreparedMarble) -> None:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(
        load.host, load.port, ssl=load.ctx, server_hostname="coordinator"
    )
    try:
        connected = time.perf_counter()
        data = await _post(reader, writer, wire.MESH_PATHS["nonce"], {})
        nonced = time.perf_counter()
        nonce = wire.b64d(data["nonce"], "nonce")
        quote = load.provider.get_quote(report_data_for(marble.public_der, nonce))
        body = {**marble.body, "quote": wire.b64e(quote), "nonce": wire.b64e(nonce)}
        quoted = time.perf_counter()
        answer = await _post(reader, writer, wire.MESH_PATHS["activate"], body)
        if "certificate" not in answer:
            raise RuntimeError("activation answer without a certificate")
    finally:
        writer.close()
    end = time.perf_counter()
    load.latencies.append(end - start)
    load.phases.append((connected - start, nonced - connected, quoted - nonced, end - quoted))


async def _closed_loop(load: Load, concurrency: int) -> None:
    queue = list(reversed(load.marbles))

    async def slot() -> None:
        while queue:
            marble = queue.pop()
            try:
                await _activate_one(load, marble)
            except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as exc:
                load.errors.append(str(exc))

    await asyncio.gather(*(slot() for _ in range(concurrency)))


async def _open_loop(load: Load, rate: float) -> None:
    """Activations start at ``rate`` per second whatever the answers do (a steady load)."""
    tasks = []
    start = time.perf_counter()

    async def one(marble: PreparedMarble) -> None:
        try:
            await _activate_one(load, marble)
        except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as exc:
            load.errors.append(str(exc))

    for i, marble in enumerate(load.marbles):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(marble)))
    await asyncio.gather(*tasks)


def run_load(load: Load, concurrency: int, rate: float | None = None) -> None:
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(_open_loop(load, rate) if rate else _closed_loop(load, concurrency))


def client_context(root: x509.Certificate) -> ssl.SSLContext:
    """What ``client.Connection`` builds: TLS pinned to the root, no hostname check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=cert_to_pem(root).decode())
    return ctx


def measure(
    *,
    pid: int,
    mesh_addr: str,
    root: x509.Certificate,
    provider: SimulationProvider,
    marble_type: str,
    activations: int,
    concurrency: int,
    rate: float | None = None,
) -> dict[str, Any]:
    host, port = client.parse_address(mesh_addr)
    load = Load(host, port, client_context(root), provider, prepare(marble_type, activations))
    busy0 = cpu_busy_seconds(COORDINATOR_CPU)
    loop0 = loop_cpu_seconds(pid)
    cpu0, own0, wall0 = cpu_seconds(pid), time.process_time(), time.perf_counter()
    run_load(load, concurrency, rate)
    wall = time.perf_counter() - wall0
    cpu, own = cpu_seconds(pid) - cpu0, time.process_time() - own0
    loop = loop_cpu_seconds(pid) - loop0
    others = max(cpu_busy_seconds(COORDINATOR_CPU) - busy0 - cpu, 0.0)
    n = len(load.latencies)
    if not n:
        raise SystemExit(f"{marble_type}: no activation succeeded: {load.errors[:3]}")
    return {
        "n": n,
        "errors": len(load.errors),
        "first_errors": load.errors[:3],
        "activations_per_s": round(n / wall, 1),
        "activations_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None,
        "coordinator_cpu_use": round(cpu / wall, 2),
        # CPU ms per activation on the event loop (TLS, HTTP) and on the other threads
        "coordinator_loop_ms": round(loop / n * 1000, 3),
        "coordinator_other_threads_ms": round((cpu - loop) / n * 1000, 3),
        "others_on_coordinator_cpu": round(others / wall, 2),
        "loadgen_ms_per_activation": round(own / n * 1000, 2),
        "loadgen_cpu_use": round(own / wall, 2),
        "p50_ms": round(statistics.median(load.latencies) * 1000, 1),
        "p99_ms": round(_percentile(load.latencies, 99) * 1000, 1),
        # p50/p99 of each phase (ms), and the phases of the activations at or above p99
        "phases_p50_p99_ms": {
            name: [
                round(statistics.median(p[i] for p in load.phases) * 1000, 1),
                round(_percentile([p[i] for p in load.phases], 99) * 1000, 1),
            ]
            for i, name in enumerate(PHASES)
        },
        "phases_of_slowest_1pct_ms": {
            name: round(statistics.mean(p[i] for p in _slowest(load)) * 1000, 1)
            for i, name in enumerate(PHASES)
        },
    }


# -- the scenario ---------------------------------------------------------------------------
def run(
    activations: int,
    concurrency: int,
    ready_samples: int,
    only: list[str],
    rates: list[float],
    store: str = "file",
) -> dict[str, Any]:
    from integration.conftest import Mesh, Signer

    base = Path(tempfile.mkdtemp(prefix="meshproxy-coordinator-bench-"))
    results: dict[str, Any] = {
        "activations": activations,
        "concurrency": concurrency,
        "rates": rates,
        "pinned": _two_cpus(),
    }
    with contextlib.ExitStack() as stack:
        extra = ["--simulation"]
        if store == "etcd":  # one replica on a local etcd (on the load's CPU), stopped last
            from integration.test_lifecycle_env import etcd_server

            etcd = stack.enter_context(etcd_server(base))
            extra += ["--store", "etcd", "--etcd-endpoints", etcd.url]
        results["store"] = store
        c = stack.enter_context(Cluster(base))
        coordinator = c.start_coordinator(extra=extra)
        pid = coordinator.popen.pid
        pin_process(pid, COORDINATOR_CPU)
        signer_key = base / "signer.pem"
        c.cli("enclave", "keygen", "-o", str(signer_key))
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
                    "plain": {"Package": "p"},
                    "counted": {"Package": "p", "MaxActivations": 10 * activations + 100},
                    "secrets": {
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
        identity = EnclaveIdentity(
            unique_id=hashlib.sha256(b"bench").digest(),
            signer_id=bytes.fromhex(signer.signer_id),
            product_id=1,
            security_version=1,
            debug=False,
        )
        provider = SimulationProvider(SimulationPlatform.load(platform_dir), identity)
        pin_process(pid, COORDINATOR_CPU)  # threads started since
        for marble_type in only:
            results[marble_type] = measure(
                pid=pid,
                mesh_addr=c.mesh_addr,
                root=root,
                provider=provider,
                marble_type=marble_type,
                activations=activations,
                concurrency=concurrency,
            )
        for rate in rates:  # latency under a steady load below saturation
            results[f"steady_{rate:g}"] = measure(
                pid=pid,
                mesh_addr=c.mesh_addr,
                root=root,
                provider=provider,
                marble_type="plain",
                activations=max(int(rate * 4), 100),
                concurrency=concurrency,
                rate=rate,
            )
        # The marbles inherit this process's CPU: first the load's CPU alone (a one-core
        # node), then both (the agent attests while the proxy loads its data plane; the
        # coordinator's CPU is idle but for the two requests).
        app = [sys.executable, "-c", "import time; time.sleep(30)"]
        compile_package()
        for figure, cpus in (("start_to_ready_ms", {LOAD_CPU}), ("start_to_ready_2cpu_ms", None)):
            if not ready_samples or (cpus is None and not _two_cpus()):
                continue
            before = os.sched_getaffinity(0)
            if _two_cpus():
                os.sched_setaffinity(0, cpus or {LOAD_CPU, COORDINATOR_CPU})
            try:
                results[figure] = time_starts(mesh, app, ready_samples, f"r{len(cpus or ())}")
            finally:
                os.sched_setaffinity(0, before)
    return results


def compile_package() -> None:
    """Write meshproxy's bytecode before timing starts, as installing a wheel does.

    meshproxy's own processes write no bytecode (what a simulated enclave measures includes
    it), so without this every start would compile each module it imports from source.
    Checked-hash pycs load only while they match their source's hash."""
    import compileall
    import py_compile

    import meshproxy

    compileall.compile_dir(
        Path(meshproxy.__file__).parent,
        quiet=1,
        invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH,
    )


def time_starts(mesh: Any, app: list[str], samples: int, prefix: str) -> dict[str, Any]:
    """Start ``samples`` marbles one after the other; time each from the spawn to its
    ready.json, and the steps on the way from its log."""
    ready: list[float] = []
    phases: list[dict[str, float]] = []
    for i in range(samples):
        cfg = mesh.marble_config(f"{prefix}-{i}", "ready", app=app)
        wall0, start = time.time(), time.perf_counter()
        proc = mesh.start(f"{prefix}-{i}", cfg, app, wait=False)
        wait_ready(marble_workdir(cfg) / "ready.json", proc.popen)
        ready.append(time.perf_counter() - start)
        proc.stop()
        phases.append(log_phases(proc.log, wall0))
    return {
        "median": round(statistics.median(ready) * 1000, 1),
        "max": round(max(ready) * 1000, 1),
        "n": len(ready),
        "phases_median_ms": {
            event: round(statistics.median(p[event] for p in phases if event in p), 1)
            for event in READY_EVENTS
            if any(event in p for p in phases)
        },
    }


# The marble's log events on the way to ready, in order (their times: ms after the spawn).
READY_EVENTS = (
    "runtime.start",  # interpreter, imports, config (the agent was forked just before)
    "attestation.simulation",  # the agent: its imports (cryptography, attestation)
    "attestation.measured",  # the signed description checked, the package re-hashed
    "activation.start",  # key, the coordinator client imported
    "activation.done",  # the two coordinator requests
    "files.written",
    "tls.engine",  # the proxy's side: the answer read, listeners
    "app.start",
    "runtime.ready",  # ready.json written
)


def wait_ready(path: Path, proc: Any, timeout: float = 60) -> None:
    """Wait for the marble's ready.json, checking every millisecond (the harness's
    backoff, up to 200 ms between checks, would add up to 200 ms to a start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            json.loads(path.read_bytes())
            return
        except (FileNotFoundError, json.JSONDecodeError):
            if proc.poll() is not None:
                raise SystemExit(f"the marble exited with {proc.returncode} before ready") from None
            time.sleep(0.001)
    raise SystemExit(f"the marble was not ready in {timeout:.0f}s")


def log_phases(log: Path, wall0: float) -> dict[str, float]:
    """Milliseconds from the spawn to each of READY_EVENTS, from the marble's JSON log."""
    from datetime import datetime

    out: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
            event, ts = doc.get("event"), doc["ts"]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        if event in READY_EVENTS and event not in out:
            when = datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            out[event] = (when - wall0) * 1000
    return out


def report(results: dict[str, Any]) -> str:
    lines = [
        f"{'scenario':<36}{'act/s':>8}{'act/cpu-s':>10}{'loop ms':>8}{'core ms':>8}"
        f"{'coord cpu':>10}{'others':>7}{'gen ms':>8}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}"
    ]
    steady = [(f"steady_{r:g}", f"plain, steady {r:g}/s offered") for r in results["rates"]]
    for name, text in [*SCENARIOS.items(), *steady]:
        r = results.get(name)
        if r is None:
            continue
        lines.append(
            f"{text:<36}{r['activations_per_s']:>8}{r['activations_per_cpu_s']!s:>10}"
            f"{r['coordinator_loop_ms']:>8}{r['coordinator_other_threads_ms']:>8}"
            f"{r['coordinator_cpu_use']:>10}{r['others_on_coordinator_cpu']:>7}"
            f"{r['loadgen_ms_per_activation']:>8}"
            f"{r['p50_ms']:>8}{r['p99_ms']:>8}{r['errors']:>7}"
        )
        if r["loadgen_cpu_use"] > 0.9:
            lines.append(f"  ({name}: the load generator used {r['loadgen_cpu_use']} of its CPU)")
        slow = r["phases_of_slowest_1pct_ms"]
        lines.append(
            "  phases p50/p99 ms: "
            + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in r["phases_p50_p99_ms"].items())
            + "; slowest 1% (mean): "
            + ", ".join(f"{k} {v}" for k, v in slow.items())
        )
        if name in SCENARIOS:  # closed loop: the mean latency Little's law leaves it
            bound = results["concurrency"] / r["activations_per_s"] * 1000
            lines.append(
                f"  (closed loop: mean latency = {results['concurrency']} / rate = "
                f"{bound:.1f} ms at this rate)"
            )
    for key, where in (("start_to_ready_ms", "1 CPU"), ("start_to_ready_2cpu_ms", "2 CPUs")):
        if key not in results:
            continue
        r = results[key]
        lines.append(
            f"marble start-to-ready ({where}): median {r['median']} ms, max {r['max']} ms "
            f"(n={r['n']})"
        )
        steps = ", ".join(f"{k} {v}" for k, v in r.get("phases_median_ms", {}).items())
        if steps:
            lines.append(f"  ms after spawn (medians, log times to 1 ms): {steps}")
    concurrency = results["concurrency"]
    lines.append(
        f"({concurrency} marbles at once; coordinator on CPU {COORDINATOR_CPU}, load on CPU "
        f"{LOAD_CPU}{'' if results['pinned'] else ' -- NOT pinned: one CPU only'}; "
        f"store: {results['store']})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coordinator_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--activations", type=int, default=1500, help="per scenario (1500)")
    p.add_argument("--concurrency", type=int, default=16, help="marbles at once (16)")
    p.add_argument("--ready-samples", type=int, default=5, help="marble starts timed (5)")
    p.add_argument(
        "--only", action="append", choices=sorted(SCENARIOS), help="run only these scenarios"
    )
    p.add_argument(
        "--rate",
        type=float,
        action="append",
        help="then 4 s of plain activations started at this rate, for latency under a "
        "steady load; repeat for several (default 250, 400, 450: half the 500/s target "
        "and near it; 0: none)",
    )
    p.add_argument(
        "--store",
        choices=["file", "etcd"],
        default="file",
        help="the coordinator's store: a file (default) or a local etcd (started here)",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if _two_cpus():
        os.sched_setaffinity(0, {LOAD_CPU})
    only = args.only or list(SCENARIOS)
    rates = [r for r in (args.rate or DEFAULT_RATES) if r > 0]
    results = run(args.activations, args.concurrency, args.ready_samples, only, rates, args.store)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
