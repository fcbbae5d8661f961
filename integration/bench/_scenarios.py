"""The scenarios: one measurement each, against one running candidate.

Each call adds one sample per metric; the orchestrator repeats the calls (candidates
interleaved, so slow drifts of a shared machine spread over all of them) and the medians
become the results. CPU figures come from ``Meter``: utime + stime of the proxy's own
processes over the load, so ``*_per_cpu_s`` = work / proxy CPU-seconds. The machine may
be shared: a measurement that other work disturbed is run again (see ``_measure``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from integration.bench import _loads as loads
from integration.bench._candidates import Context, Server
from integration.bench._loads import PROXY_CPU
from integration.bench._procs import Meter, accepts, busy_pct, cpu_times, rss_kib, wait_until
from integration.harness import free_port

MB = 1e6  # MB/s here are 10^6 bytes per second, as openssl speed and the anchors use
IDLE_CONNS = 1000
FOREIGN_LIMIT_PCT = 10.0  # other work's CPU share (of one CPU) above which a run is redone
RETRIES = 2

Key = tuple[str, str, int, str]  # scenario, candidate, proxy cores, metric


@dataclass
class Samples:
    values: dict[Key, list[float]] = field(default_factory=dict)

    def add(self, scenario: str, cand: str, cores: int, metrics: dict[str, float]) -> None:
        for metric, value in metrics.items():
            self.values.setdefault((scenario, cand, cores, metric), []).append(float(value))


@dataclass(frozen=True)
class Sizes:
    bulk_bytes: int  # each way, split over the connections
    wrk_seconds: int
    handshake_seconds: float


class Scenarios:
    def __init__(self, ctx: Context, sizes: Sizes, samples: Samples) -> None:
        self.ctx = ctx
        self.sizes = sizes
        self.samples = samples
        self.cipher: str | None = None
        self.retried = 0  # measurements run again because other work disturbed them
        self.measured = 0

    def _measure(self, run: Callable[[], tuple[dict[str, float], Meter]]) -> dict[str, float]:
        """One measurement; again (at most twice) if other work took a CPU share meanwhile.

        The machine is shared: a burst of someone else's work steals CPU from the proxy or
        the harness and makes a cell meaningless. Of the attempts, the least disturbed one
        is kept, and its disturbance is recorded (``other_cpu_pct``, % of one CPU).
        """
        best: tuple[dict[str, float], Meter] | None = None
        for attempt in range(1 + RETRIES):
            if attempt:
                self.retried += 1
                self.quiet()
            metrics, meter = run()
            if best is None or meter.foreign_pct < best[1].foreign_pct:
                best = (metrics, meter)
            if meter.foreign_pct <= FOREIGN_LIMIT_PCT:
                break
        assert best is not None
        self.measured += 1
        metrics, meter = best
        busy = meter.busy
        return {
            **metrics,
            "proxy_cpu_pct": 100 * meter.cpu_s / meter.wall_s,
            "cpu0_busy_pct": busy.get("cpu0", 0.0),
            "cpu1_busy_pct": busy.get("cpu1", 0.0),
            "other_cpu_pct": meter.foreign_pct,
        }

    # bulk --------------------------------------------------------------------------------
    def _bulk_once(
        self, addr: str, direction: str, conns: int, pids: Callable[[], list[int]]
    ) -> tuple[dict[str, float], Meter]:
        c = self.ctx
        with Meter(pids) as m:
            r = loads.bulk(c.bin_dir, addr, direction, self.sizes.bulk_bytes, conns, c.certs)
        self.cipher = r["cipher"]
        return {"mbps_wall": r["mbps"], "mbps_per_cpu_s": r["bytes"] / MB / max(m.cpu_s, 0.01)}, m

    def _bulk(self, addr: str, conns: int, pids: Callable[[], list[int]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for direction in ("up", "down"):
            metrics = self._measure(partial(self._bulk_once, addr, direction, conns, pids))
            out |= {f"{direction}_{k}": v for k, v in metrics.items()}
        return out

    def bulk(self, server: Server, prefix: str, cores: int) -> None:
        for conns in (1, 8):
            metrics = self._bulk(server.listeners.bulk, conns, server.proxy_pids)
            self.samples.add(f"{prefix}bulk-{conns}conn", server.name, cores, metrics)

    def tls_direct(self) -> None:
        """The TLS ceiling: bulkc straight into the C sink (TLS) on CPU 1, no proxy."""
        c = self.ctx
        addr = f"127.0.0.1:{free_port()}"
        certs = [str(c.certs.server_chain), str(c.certs.server_key), str(c.certs.ca_chain)]
        sink = str(c.bin_dir / "sink")
        proc = c.procs.spawn(
            "tls-direct-sink", ["taskset", "-c", PROXY_CPU, sink, addr, "600", *certs]
        )
        try:
            wait_until(lambda: accepts(addr), 15, "the TLS sink", proc)
            for conns in (1, 8):
                metrics = self._bulk(addr, conns, lambda: [proc.pid])
                self.samples.add(f"bulk-{conns}conn", "tls-direct", 1, metrics)
        finally:
            c.procs.stop(proc)

    def speed(self, seconds: int, quick: bool) -> tuple[str, ...]:
        """openssl speed (AES-128-GCM, ECDSA P-256) on CPU 1; returns the commands run."""
        commands: tuple[str, ...] = ()

        def run() -> tuple[dict[str, float], Meter]:
            nonlocal commands
            with Meter(list) as m:
                speed = loads.openssl_speed(seconds, quick)
            commands = speed.commands
            metrics = {
                "aes_128_gcm_16k_mbps": speed.aes128gcm_16k_mbps,
                "ecdsa_p256_sign_per_s": speed.ecdsa_sign_per_s,
                "ecdsa_p256_verify_per_s": speed.ecdsa_verify_per_s,
            }
            return metrics, m

        metrics = self._measure(run)
        self.samples.add("ceilings", "openssl", 1, metrics)
        return commands

    # requests ----------------------------------------------------------------------------
    def _requests_once(self, server: Server) -> tuple[dict[str, float], Meter]:
        with Meter(server.proxy_pids) as m:
            r = loads.wrk(server.listeners.web, self.sizes.wrk_seconds)
        metrics = {
            "req_per_s_wall": r["req_per_s"],
            "req_per_cpu_s": r["requests"] / max(m.cpu_s, 0.01),
            "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"],
            "errors": r["errors"],
        }
        return metrics, m

    def requests(self, server: Server, prefix: str, cores: int) -> None:
        metrics = self._measure(lambda: self._requests_once(server))
        self.samples.add(f"{prefix}requests", server.name, cores, metrics)

    # handshakes --------------------------------------------------------------------------
    def _handshakes_once(self, server: Server) -> tuple[dict[str, float], Meter]:
        c = self.ctx
        with Meter(server.proxy_pids) as m:
            r = loads.handshakes(
                c.bin_dir, server.listeners.webm, self.sizes.handshake_seconds, c.certs
            )
        conns = max(r["conns"], 1)
        metrics = {
            "conn_per_s_wall": r["conn_per_s"],
            "conn_per_cpu_s": r["conns"] / max(m.cpu_s, 0.01),
            # the load side's CPU per connection: the client (hsc) alone, and all of CPU 0
            # (client, HTTP backend, kernel, and any other work there)
            "client_cpu_us_per_conn": 1e6 * r["client_cpu_s"] / conns,
            "cpu0_cpu_us_per_conn": 1e4 * m.busy.get("cpu0", 0.0) * m.wall_s / conns,
            "failures": r["failures"],
            "tickets_per_conn": r["tickets_per_conn"],
        }
        return metrics, m

    def handshakes(self, server: Server) -> None:
        self.samples.add(
            "handshakes", server.name, 1, self._measure(lambda: self._handshakes_once(server))
        )

    # memory ------------------------------------------------------------------------------
    def memory(self, server: Server) -> None:
        """RSS of a proxy nobody has talked to yet, then with IDLE_CONNS idle mTLS conns."""
        loads.settle(1.0)
        idle = rss_kib(server.proxy_pids())
        hold = loads.Hold(self.ctx.bin_dir, server.listeners.webm, IDLE_CONNS, self.ctx.certs)
        try:
            held = hold.wait_held()
            loads.settle(2.0)  # the proxy finishes its side: verification, backend connect
            busy = rss_kib(server.proxy_pids())
        finally:
            hold.release()
        n = int(held["held"])
        if n < IDLE_CONNS:
            raise loads.LoadError(f"only {n} of {IDLE_CONNS} idle connections were accepted")
        metrics = {
            "rss_idle_mib": idle / 1024,
            "rss_growth_kib_per_1000_conns": (busy - idle) * 1000 / n,
        }
        self.samples.add("memory", server.name, 1, metrics)

    # background --------------------------------------------------------------------------
    def quiet(self, limit_pct: float = 15.0, max_wait_s: float = 20.0) -> bool:
        """Wait (bounded) until both CPUs are nearly idle: other work shares this machine.

        Samples 0.5 s at a time while nothing of the bench runs; the last sample is kept
        as the background load. Returns False if the machine never got quiet.
        """
        deadline = time.monotonic() + max_wait_s
        while True:
            before = cpu_times()
            loads.settle(0.5)
            busy = busy_pct(before, cpu_times())
            quiet = max(busy.values()) <= limit_pct
            if quiet or time.monotonic() >= deadline:
                metrics = {f"{k}_busy_pct": v for k, v in busy.items()}
                self.samples.add("background", "machine", 0, {**metrics, "quiet": float(quiet)})
                return quiet
