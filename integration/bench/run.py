"""``make bench``: meshproxy side by side with haproxy, nginx and stunnel, in one run.

Method (perf-anchors.md): the proxy under test is pinned to CPU 1, load generators and
backends to CPU 0; all traffic on 127.0.0.1; every figure is recorded per wall-clock
second and per CPU-second of the proxy's own processes (utime + stime from /proc); every
process started here is stopped by its process-group id at the end, also on Ctrl-C.

Order: build the C tools -> coordinator, manifest, certificates (activated honestly) ->
shared backends -> physical limits -> with the proxy on 1 core, then on 2 cores: for each
repetition, each candidate in turn is started, measured and stopped -> medians into
results.json and the tables.

    integration/bench/run.sh [--quick] [--only SCENARIO] [--candidate NAME] [--reps N] [--keep]
                             [--http-backend httpd|nginx] [--backend-sched normal|batch]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from integration.bench import _loads as loads
from integration.bench._candidates import (
    BACKEND_SCHEDS,
    HTTP_BACKENDS,
    Context,
    Server,
    native_engine_api,
    start_backends,
    start_haproxy,
    start_meshproxy,
    start_nginx,
    start_stunnel,
)
from integration.bench._h2 import run_h2
from integration.bench._pki import BenchMesh
from integration.bench._procs import Processes
from integration.bench._report import Results, render
from integration.bench._scenarios import FOREIGN_LIMIT_PCT, Samples, Scenarios, Sizes

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
SCENARIOS = ("ceilings", "bulk", "requests", "handshakes", "memory", "scaling", "h2")
CANDIDATES = ("meshproxy-py", "meshproxy-native", "haproxy", "nginx", "stunnel")
TOOLS = ("bulkc", "hsc", "sink", "httpd")
NEEDED = ("taskset", "chrt", "gcc", "haproxy", "nginx", "stunnel4", "wrk", "openssl")
# The result scenarios (table rows) each --only scenario produces.
PRODUCES = {
    "bulk": ("bulk-1conn", "bulk-8conn"),
    "scaling": ("scaling-bulk-1conn", "scaling-bulk-8conn", "scaling-requests"),
}
FAILURES = (loads.LoadError, RuntimeError, TimeoutError, OSError, KeyError, ValueError)


@dataclass(frozen=True)
class Plan:
    quick: bool
    scenarios: frozenset[str]
    reps: int
    candidates: tuple[str, ...]
    keep: bool
    http_backend: str
    backend_sched: str

    @property
    def sizes(self) -> Sizes:
        if self.quick:
            return Sizes(bulk_bytes=64 * 2**20, wrk_seconds=3, handshake_seconds=2.0)
        return Sizes(bulk_bytes=2**30, wrk_seconds=10, handshake_seconds=5.0)

    @property
    def speed_seconds(self) -> int:
        return 1 if self.quick else 3


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(
        prog="integration/bench/run.sh",
        description="meshproxy vs haproxy, nginx and stunnel (see integration/bench/README.md)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 MiB bulk, 3 s wrk, 2 s handshakes, 1 repetition",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--candidate",
        action="append",
        choices=CANDIDATES,
        metavar="NAME",
        help=f"run only this candidate (repeatable): {', '.join(CANDIDATES)}",
    )
    p.add_argument(
        "--reps", type=int, help="repetitions per cell, medians reported (default 3; --quick: 1)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--http-backend",
        choices=HTTP_BACKENDS,
        default="httpd",
        help="the HTTP/1.1 backend of every candidate (requests, handshakes, memory): the C "
        "responder clients/httpd.c (default) or nginx; README 'Backends'",
    )
    p.add_argument(
        "--backend-sched",
        choices=BACKEND_SCHEDS,
        default="normal",
        help="scheduling policy of that HTTP backend on CPU 0: the normal one (default) or "
        "SCHED_BATCH (it does not preempt the load client; answers come in bursts; README "
        "'Backends')",
    )
    args = p.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if not 1 <= reps <= 10:
        p.error("--reps must be from 1 to 10")
    return Plan(
        quick=args.quick,
        scenarios=frozenset(args.only or SCENARIOS),
        reps=reps,
        candidates=tuple(args.candidate or CANDIDATES),
        keep=args.keep,
        http_backend=args.http_backend,
        backend_sched=args.backend_sched,
    )


# -- setup --------------------------------------------------------------------------------
def preflight() -> None:
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs at least 2 CPUs (proxy on CPU 1, load on CPU 0)")
    missing = [t for t in NEEDED if not shutil.which(t)]
    if missing:
        sys.exit(f"bench: missing {', '.join(missing)}; run integration/bench/setup.sh")
    # 1,000 idle connections need ~3,000 descriptors in the proxy; raise the soft limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def build_tools(out: Path, tools: tuple[str, ...] = TOOLS) -> None:
    src = HERE / "clients"
    out.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        cmd = [
            "gcc",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(out / tool),
            str(src / f"{tool}.c"),
            str(src / "common.c"),
            *(["-lgnutls"] if tool == "hsc" else []),  # hsc rate's TLS client (see hsc.c)
            "-lssl",
            "-lcrypto",
            "-lpthread",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            sys.exit(f"bench: building {tool} failed:\n{res.stderr}")


def _version(argv: list[str], pattern: str = "") -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    lines = [ln for ln in lines if pattern in ln] or lines
    return lines[0] if lines else "unknown"


def _native_build() -> str:
    api = native_engine_api()
    so = sorted(HERE.parent.parent.glob("meshproxy/_native_tls*.so"))
    built = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(so[0].stat().st_mtime)) if so else "?"
    return f"ENGINE_API {api}, module built {built}"


def describe_machine(plan: Plan) -> tuple[dict[str, object], dict[str, str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
    release = Path("/etc/os-release").read_text() if Path("/etc/os-release").exists() else ""
    os_name = re.search(r'^PRETTY_NAME="?([^"\n]+)', release, re.M)
    machine: dict[str, object] = {
        "cpu": model.group(1) if model else "unknown",
        "cpus": os.cpu_count(),
        "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "os": os_name.group(1) if os_name else "unknown",
        "layout": "proxy on CPU 1 (scaling: CPUs 0-1); load generators and backends on CPU 0; "
        f"HTTP/1.1 backend {plan.http_backend} ({plan.backend_sched} scheduling)",
    }
    versions = {
        "meshproxy": _version([sys.executable, "-m", "meshproxy", "--version"]),
        "meshproxy_commit": _version(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"])
        + " (plus uncommitted changes, if any)",
        "meshproxy_native": _native_build(),
        "python": sys.version.split()[0],
        "openssl": _version(["openssl", "version"]),
        "haproxy": _version(["haproxy", "-v"]),
        "nginx": _version(["nginx", "-v"]),
        "stunnel": _version(["stunnel4", "-version"], "stunnel "),
        "wrk": _version(["wrk", "-v"]),
        "h2load": _version(["h2load", "--version"]),
        "gcc": _version(["gcc", "--version"]),
    }
    return machine, versions


# -- running ------------------------------------------------------------------------------
class Runner:
    def __init__(self, plan: Plan, ctx: Context, mesh: BenchMesh, results: Results) -> None:
        self.plan = plan
        self.ctx = ctx
        self.mesh = mesh
        self.results = results
        self.samples = Samples()
        self.scenarios = Scenarios(ctx, plan.sizes, self.samples)
        self.native_api = native_engine_api()
        self.started = time.monotonic()

    def ceilings(self) -> None:
        self.progress("physical limits (openssl speed, TLS into the C sink) on CPU 1")
        commands = self.scenarios.speed(self.plan.speed_seconds, self.plan.quick)
        self.results.notes.append(f"ceilings: {'; '.join(commands)} (pinned to CPU 1)")
        for _ in range(self.plan.reps):
            self.scenarios.tls_direct()

    def progress(self, text: str) -> None:
        print(f"bench: [{time.monotonic() - self.started:4.0f} s] {text}", flush=True)

    def _starter(self, name: str, cores: int) -> Callable[[], Server]:
        cpus = "1" if cores == 1 else "0,1"
        ctx, mesh = self.ctx, self.mesh
        return {
            "meshproxy-py": lambda: start_meshproxy(ctx, mesh, cpus, cores, native="off"),
            "meshproxy-native": lambda: start_meshproxy(ctx, mesh, cpus, cores, native="require"),
            "haproxy": lambda: start_haproxy(ctx, cpus, cores),
            "nginx": lambda: start_nginx(ctx, cpus, cores),
            "stunnel": lambda: start_stunnel(ctx, cpus, cores),
        }[name]

    def _steps(self, cores: int) -> list[tuple[str, Callable[[Server], None]]]:
        sc = self.scenarios
        if cores == 1:
            steps: list[tuple[str, Callable[[Server], None]]] = [
                ("memory", sc.memory),  # first: the idle RSS of a fresh proxy
                ("bulk", lambda s: sc.bulk(s, "", 1)),
                ("requests", lambda s: sc.requests(s, "", 1)),
                ("handshakes", sc.handshakes),
            ]
        else:
            steps = [
                ("scaling", lambda s: sc.bulk(s, "scaling-", 2)),
                ("scaling", lambda s: sc.requests(s, "scaling-", 2)),
            ]
        return [(name, fn) for name, fn in steps if name in self.plan.scenarios]

    def candidates(self, cores: int) -> None:
        steps = self._steps(cores)
        if not steps:
            return
        names = list(self.plan.candidates)
        if "meshproxy-native" in names and (self.native_api or 0) < 1:
            names.remove("meshproxy-native")
            if cores == 1:
                self.results.problem(
                    "all",
                    "meshproxy-native",
                    "available",
                    f"not available: meshproxy._native_tls ENGINE_API = {self.native_api}",
                )
        for rep in range(self.plan.reps):
            for name in names:
                what = ", ".join(dict.fromkeys(s for s, _ in steps))
                self.progress(f"rep {rep + 1}/{self.plan.reps}: {name} on {cores} core(s): {what}")
                self.one(name, cores, steps)

    def one(self, name: str, cores: int, steps: list[tuple[str, Callable[[Server], None]]]) -> None:
        server = None
        for attempt in range(2):  # once more: e.g. meshproxy's code changed under its signature
            self.scenarios.quiet()
            try:
                server = self._starter(name, cores)()
                break
            except FAILURES as exc:
                print(f"bench: {name} failed to start: {exc}", file=sys.stderr, flush=True)
                if attempt:
                    for scenario in dict.fromkeys(s for s, _ in steps):
                        self._problem(scenario, name, "start", f"failed to start: {exc}")
        if server is None:
            return
        try:
            for note in server.notes:
                if note not in self.results.notes:
                    self.results.notes.append(note)
            for scenario, fn in steps:
                try:
                    fn(server)
                except FAILURES as exc:
                    self._problem(scenario, name, "error", f"failed: {exc}")
                    print(f"bench: {name} {scenario} failed: {exc}", file=sys.stderr, flush=True)
                loads.settle(0.5)
        finally:
            self.ctx.procs.stop(server.proc)

    def _problem(self, scenario: str, name: str, metric: str, detail: str) -> None:
        for table in PRODUCES.get(scenario, (scenario,)):
            self.results.problem(table, name, metric, detail)

    def finish(self) -> None:
        """Medians of the samples into the results; the background load into the notes."""
        for (scenario, cand, cores, metric), values in self.samples.values.items():
            if scenario == "background":
                continue
            self.results.add(scenario, cand, metric, values, _unit(metric), cores=cores)
        bg = {m: v for (s, _, _, m), v in self.samples.values.items() if s == "background"}
        if bg:
            quiet = bg.pop("quiet", [])
            parts = [
                f"{m.split('_')[0]} median {statistics.median(v):.0f}% (max {max(v):.0f}%)"
                for m, v in sorted(bg.items())
            ]
            self.results.notes.append(
                "other work on this machine, sampled while nothing of the bench ran, before "
                f"each candidate and each re-run (waiting up to 20 s for both CPUs <= 15 %): "
                f"{', '.join(parts)}; quiet {int(sum(quiet))} of {len(quiet)} times"
            )
        sc = self.scenarios
        self.results.notes.append(
            f"other% = CPU other processes on this machine used during a measurement, in % "
            f"of one CPU; above {FOREIGN_LIMIT_PCT:.0f} % a measurement was run again (at most "
            f"twice, the least disturbed kept): {sc.retried} re-runs for {sc.measured} "
            "measurements"
        )
        if self.scenarios.cipher:
            self.results.notes.append(f"negotiated cipher: {self.scenarios.cipher}")


_HTTP_BACKEND_NOTE = {
    "httpd": "the C responder clients/httpd.c",
    "nginx": "nginx, --http-backend nginx",
}


_SCHED_NOTE = {
    "normal": "normal scheduling on CPU 0",
    "batch": "SCHED_BATCH on CPU 0, --backend-sched batch",
}


def _unit(metric: str) -> str:
    units = (
        ("_mbps_wall", "MB/s"),
        ("_mbps_per_cpu_s", "MB per proxy CPU-s"),
        ("req_per_s_wall", "req/s"),
        ("req_per_cpu_s", "req per proxy CPU-s"),
        ("conn_per_s_wall", "conn/s"),
        ("conn_per_cpu_s", "conn per proxy CPU-s"),
        ("_us_per_conn", "us CPU per conn"),
        ("_pct", "%"),
        ("_mbps", "MB/s"),
        ("_per_s", "ops/s"),
        ("_ms", "ms"),
        ("_mib", "MiB"),
        ("_conns", "KiB"),
        ("errors", "count"),
        ("failures", "count"),
        ("tickets_per_conn", "tickets"),
    )
    return next((unit for suffix, unit in units if metric.endswith(suffix)), "")


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run through the blocks that stop everything
    (SIGINT too: a shell starts background jobs with it ignored)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    preflight()
    started = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="meshproxy-bench-"))
    (base / "logs").mkdir()
    (base / "work").mkdir()
    procs = Processes(base / "logs")
    mesh = BenchMesh(base)
    ok = False
    with signals_as_interrupts():
        try:
            build_tools(base / "bin")
            results = Results(*describe_machine(plan))
            print(f"bench: in {base}: coordinator, manifest, certificates", flush=True)
            mesh.start()
            ctx = Context(
                procs,
                mesh.cert_files(base / "certs"),
                base / "bin",
                base / "work",
                base / "work" / "sink.sock",
                base / "work" / "web.sock",
                plan.http_backend,
                plan.backend_sched,
            )
            start_backends(ctx)
            runner = Runner(plan, ctx, mesh, results)
            if "ceilings" in plan.scenarios:
                runner.ceilings()
            runner.candidates(1)
            runner.candidates(2)
            if "h2" in plan.scenarios:
                run_h2(runner)
            runner.finish()
            sizes = plan.sizes
            results.notes += [
                "backends: every candidate reaches the same C sink and HTTP/1.1 backend "
                f"({_HTTP_BACKEND_NOTE[plan.http_backend]}, {_SCHED_NOTE[plan.backend_sched]}) "
                "over Unix sockets; h2: nginx h2c",
                f"{'quick' if plan.quick else 'full'} run: bulk {sizes.bulk_bytes // 2**20} MiB "
                f"each way, wrk {sizes.wrk_seconds} s, handshakes {sizes.handshake_seconds:.0f} s, "
                f"{plan.reps} repetition(s) per cell (median), "
                f"{time.monotonic() - started:.0f} s in total",
            ]
            results.write(RESULTS)
            print("\n" + render(results))
            print(f"\nbench: wrote {RESULTS}")
            ok = True
        except KeyboardInterrupt:
            print("\nbench: interrupted; stopping everything it started", file=sys.stderr)
        finally:
            procs.stop_all()
            mesh.close()
            if ok and not plan.keep:
                shutil.rmtree(base, ignore_errors=True)
            else:
                print(f"bench: configs and logs kept in {base}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
