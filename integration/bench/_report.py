"""Results: one record per (scenario, candidate, metric), the JSON file, and the tables.

A record's value is the median of its samples (one per repetition; the samples are kept).
Metric names say how a figure was normalised: ``*_wall`` per wall-clock second,
``*_per_cpu_s`` per CPU-second used by the proxy's own processes. Ratios in the tables
are candidate / haproxy of the same scenario and metric in the same run (for latency and
memory, above 1 means worse).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ORDER = ["meshproxy-py", "meshproxy-native", "haproxy", "nginx", "stunnel", "tls-direct"]
BASELINE = "haproxy"
DISTURBED_PCT = 10.0  # other work's CPU share (of one CPU) that marks a cell with '*'


@dataclass
class Results:
    machine: dict[str, Any]
    versions: dict[str, str]
    records: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        scenario: str,
        candidate: str,
        metric: str,
        samples: Sequence[float],
        unit: str,
        *,
        cores: int | None = None,
        detail: str | None = None,
    ) -> None:
        rec: dict[str, Any] = {
            "scenario": scenario,
            "candidate": candidate,
            "metric": metric,
            "value": round(statistics.median(samples), 4) if samples else None,
            "unit": unit,
            "machine": self.machine,
            "versions": self.versions,
            "samples": [round(s, 4) for s in samples],
        }
        if cores is not None:
            rec["proxy_cores"] = cores
        if detail:
            rec["detail"] = detail
        self.records.append(rec)

    def problem(self, scenario: str, candidate: str, metric: str, detail: str) -> None:
        """A cell that has no figure: not available, or failed (with the reason)."""
        self.add(scenario, candidate, metric, [], "", detail=detail)

    def value(self, scenario: str, candidate: str, metric: str) -> float | None:
        for rec in self.records:
            if (rec["scenario"], rec["candidate"], rec["metric"]) == (scenario, candidate, metric):
                return rec["value"]  # type: ignore[no-any-return]
        return None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.records, indent=1) + "\n")

    # -- tables ---------------------------------------------------------------------------
    def _candidates(self, scenario: str) -> list[str]:
        seen = {r["candidate"] for r in self.records if r["scenario"] == scenario}
        if not seen or scenario == "ceilings":
            return sorted(seen)
        seen |= {r["candidate"] for r in self.records if r["scenario"] == "all"}
        return [c for c in ORDER if c in seen] + sorted(seen - set(ORDER))

    def _cell(self, scenario: str, cand: str, metric: str, fmt: str, ratio: bool) -> str:
        v = self.value(scenario, cand, metric)
        if v is None:
            return "-"
        text = format(v, fmt)
        base = self.value(scenario, BASELINE, metric)
        if ratio and base and cand != BASELINE:
            text += f" ({v / base:.2f})"
        if ratio and (
            self._disturbed(scenario, cand, metric) or self._disturbed(scenario, BASELINE, metric)
        ):
            text += "*"
        return text

    def _disturbed(self, scenario: str, cand: str, metric: str) -> bool:
        """Whether other work took more than the re-run limit during this cell's median run."""
        direction = metric.split("_")[0]
        other = f"{direction}_other_cpu_pct" if direction in ("up", "down") else "other_cpu_pct"
        v = self.value(scenario, cand, other)
        return v is not None and v > DISTURBED_PCT

    def _problems(self, scenario: str, cand: str) -> str | None:
        for rec in self.records:
            mine = rec["candidate"] == cand and rec["scenario"] in (scenario, "all")
            if mine and rec["value"] is None:
                return _one_line(str(rec.get("detail", "no figure")))
        return None

    def table(
        self, scenario: str, title: str, columns: Sequence[tuple[str, str, str, bool]]
    ) -> str:
        """columns: (metric, header, format, show ratio to haproxy)."""
        cands = self._candidates(scenario)
        if not cands:
            return ""
        head = ["candidate", *(c[1] for c in columns)]
        rows = []
        for cand in cands:
            cells = [self._cell(scenario, cand, m, f, r) for m, _, f, r in columns]
            problem = self._problems(scenario, cand)
            if problem and all(c == "-" for c in cells):
                rows.append([cand, problem])
                continue
            rows.append([cand, *cells])
        full = [r for r in [head, *rows] if len(r) == len(head)]
        widths = [max(len(r[i]) for r in full) for i in range(len(head))]
        widths[0] = max(len(r[0]) for r in [*rows, head])
        lines = [f"## {title}", _fmt_row(head, widths), _fmt_row(["-" * w for w in widths], widths)]
        for row in rows:
            if len(row) == 2 and len(head) > 2:
                lines.append(f"| {row[0].ljust(widths[0])} | {row[1]}")
            else:
                lines.append(_fmt_row(row, widths))
        return "\n".join(lines)


def _one_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # The first line says what failed; a log's last line usually says why.
    short = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return short if len(short) <= limit else short[: limit - 3] + "..."


def _fmt_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return (
        "| "
        + " | ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        )
        + " |"
    )


BULK = [
    ("up_mbps_wall", "up MB/s", ".0f", True),
    ("up_mbps_per_cpu_s", "up MB/CPU-s", ".0f", True),
    ("down_mbps_wall", "down MB/s", ".0f", True),
    ("down_mbps_per_cpu_s", "down MB/CPU-s", ".0f", True),
    ("up_proxy_cpu_pct", "proxy CPU% up", ".0f", False),
    ("up_cpu0_busy_pct", "CPU0 busy% up", ".0f", False),
    ("up_other_cpu_pct", "other% up", ".0f", False),
]
REQUESTS = [
    ("req_per_s_wall", "req/s", ".0f", True),
    ("req_per_cpu_s", "req/CPU-s", ".0f", True),
    ("p50_ms", "p50 ms", ".3f", True),
    ("p99_ms", "p99 ms", ".3f", True),
    ("errors", "errors", ".0f", False),
    ("proxy_cpu_pct", "proxy CPU%", ".0f", False),
    ("cpu0_busy_pct", "CPU0 busy%", ".0f", False),
    ("other_cpu_pct", "other%", ".0f", False),
]
HANDSHAKES = [
    ("conn_per_s_wall", "conn/s", ".0f", True),
    ("conn_per_cpu_s", "conn/CPU-s", ".0f", True),
    ("failures", "failures", ".0f", False),
    ("tickets_per_conn", "tickets/conn", ".1f", False),
    ("proxy_cpu_pct", "proxy CPU%", ".0f", False),
    ("cpu0_busy_pct", "CPU0 busy%", ".0f", False),
    ("client_cpu_us_per_conn", "client us/conn", ".0f", False),
    ("cpu0_cpu_us_per_conn", "CPU0 us/conn", ".0f", False),
    ("other_cpu_pct", "other%", ".0f", False),
]
MEMORY = [
    ("rss_idle_mib", "RSS idle MiB", ".1f", True),
    ("rss_growth_kib_per_1000_conns", "KiB per 1,000 idle conns", ".0f", True),
]
CEILINGS = [
    ("aes_128_gcm_16k_mbps", "AES-128-GCM 16 KiB MB/s", ".0f", False),
    ("ecdsa_p256_sign_per_s", "ECDSA P-256 sign/s", ".0f", False),
    ("ecdsa_p256_verify_per_s", "verify/s", ".0f", False),
]


def render(results: Results) -> str:
    parts = [
        results.table("ceilings", "Physical limits on CPU 1 (openssl speed)", CEILINGS),
        results.table(
            "bulk-1conn", "Bulk, 1 connection (tls-direct = TLS into the C sink, no proxy)", BULK
        ),
        results.table("bulk-8conn", "Bulk, 8 connections", BULK),
        results.table(
            "requests", "Requests: wrk -t1 -c16, HTTP/1.1 keep-alive, 100-byte body", REQUESTS
        ),
        results.table("handshakes", "Handshakes: new mTLS conn + 1 request + close", HANDSHAKES),
        results.table("memory", "Memory: proxy RSS", MEMORY),
        results.table("scaling-bulk-1conn", "Scaling: bulk, 1 connection, proxy on 2 cores", BULK),
        results.table("scaling-bulk-8conn", "Scaling: bulk, 8 connections, proxy on 2 cores", BULK),
        results.table("scaling-requests", "Scaling: requests, proxy on 2 cores", REQUESTS),
        results.table("h2-requests", "HTTP/2: h2load -c10 -m10 over TLS to an h2c app", REQUESTS),
    ]
    text = "\n\n".join(p for p in parts if p)
    text += (
        f"\n\n* = other work on this machine took more than {DISTURBED_PCT:.0f} % of a CPU "
        "(median over the repetitions, after re-runs) during this cell or haproxy's: read with care"
    )
    if results.notes:
        text += "\n\nNotes:\n" + "\n".join(f"* {n}" for n in results.notes)
    return text
