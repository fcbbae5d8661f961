"""The load generators (all on CPU 0) and the physical-limit probes (on CPU 1), parsed.

Every run has a subprocess timeout on top of the tool's own bound (the C tools' alarm(),
wrk's -d, openssl's -seconds), so no load can outlive its budget.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integration.bench._pki import CertFiles

LOAD_CPU = "0"
PROXY_CPU = "1"
# hsc rate connections in flight (one thread, epoll): enough that the proxy's CPU, not the
# client's round trips, limits the rate (16 was no faster; README "Where the time goes")
HSC_INFLIGHT = "8"


class LoadError(RuntimeError):
    pass


def _run(argv: list[str], timeout: float) -> str:
    tool = Path(argv[3] if argv[0] == "taskset" else argv[0]).name
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise LoadError(f"{tool}: no result within {timeout:.0f} s") from None
    if res.returncode != 0:
        raise LoadError(f"{tool} exited {res.returncode}: {res.stderr.strip()[-500:]}")
    return res.stdout


def _json_line(out: str) -> dict[str, Any]:
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            doc: dict[str, Any] = json.loads(line)
            return doc
    raise LoadError(f"no result line in: {out[-300:]!r}")


def _client_args(certs: CertFiles) -> list[str]:
    return [str(certs.client_chain), str(certs.client_key), str(certs.root)]


def bulk(
    bin_dir: Path, address: str, direction: str, total: int, conns: int, certs: CertFiles | None
) -> dict[str, Any]:
    """bulkc: total bytes in one direction over ``conns`` connections (MB/s, 10^6 B)."""
    deadline = 30 + total // (20 * 10**6)  # slower than 20 MB/s counts as broken
    argv = [
        "taskset",
        "-c",
        LOAD_CPU,
        str(bin_dir / "bulkc"),
        address,
        direction,
        str(total),
        str(conns),
        str(deadline),
    ]
    out = _run(argv + (_client_args(certs) if certs else []), deadline + 15)
    return _json_line(out)


def handshakes(bin_dir: Path, address: str, seconds: float, certs: CertFiles) -> dict[str, Any]:
    """hsc rate: new mTLS connections per second; adds the client's CPU seconds."""
    argv = [
        "taskset",
        "-c",
        LOAD_CPU,
        str(bin_dir / "hsc"),
        "rate",
        address,
        str(seconds),
        "200000",
        HSC_INFLIGHT,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = _json_line(_run(argv + _client_args(certs), seconds + 45))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # taskset execs hsc: the child's rusage is the load client's own CPU time
    doc["client_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return doc


class Hold:
    """``hsc hold``: COUNT idle mTLS connections, open until ``release()``."""

    def __init__(self, bin_dir: Path, address: str, count: int, certs: CertFiles) -> None:
        argv = ["taskset", "-c", LOAD_CPU, str(bin_dir / "hsc"), "hold", address, str(count), "120"]
        self._popen = subprocess.Popen(
            argv + _client_args(certs),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def wait_held(self) -> dict[str, Any]:
        assert self._popen.stdout is not None
        line = self._popen.stdout.readline()  # hsc's own deadline bounds this
        if not line:
            raise LoadError(f"hsc hold exited ({self._popen.wait(10)}) before holding")
        return _json_line(line)

    def release(self) -> None:
        if self._popen.stdin is not None:
            self._popen.stdin.close()
        try:
            self._popen.wait(30)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(5)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise LoadError(f"wrk latency {text!r} not understood")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(address: str, seconds: int) -> dict[str, Any]:
    argv = [
        "taskset",
        "-c",
        LOAD_CPU,
        "wrk",
        "-t1",
        "-c16",
        f"-d{seconds}s",
        "--latency",
        "--timeout",
        "5s",
        f"https://{address}/",
    ]
    out = _run(argv, seconds + 30)
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    total = re.search(r"^\s+(\d+) requests in ([\d.]+)(\w+),", out, re.M)
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if not (total and rate and "50" in pct and "99" in pct):
        raise LoadError(f"wrk output not understood: {out[-500:]!r}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests": int(total.group(1)),
        "req_per_s": float(rate.group(1)),
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "errors": errors + (int(non2xx.group(1)) if non2xx else 0),
    }


# -- physical limits (CPU 1, where the proxies run) ------------------------------------------
@dataclass(frozen=True)
class Speed:
    aes128gcm_16k_mbps: float
    ecdsa_sign_per_s: float
    ecdsa_verify_per_s: float
    commands: tuple[str, ...]


def openssl_speed(seconds: int, quick: bool) -> Speed:
    aes = ["taskset", "-c", PROXY_CPU, "openssl", "speed", "-elapsed", "-seconds", str(seconds)]
    if quick:
        aes += ["-bytes", "16384"]
    aes += ["-evp", "aes-128-gcm"]
    ec = ["taskset", "-c", PROXY_CPU, "openssl", "speed", "-seconds", str(seconds), "ecdsap256"]
    aes_out = _run(aes, seconds * 8 + 60)
    ec_out = _run(ec, seconds * 3 + 60)
    header = next(ln for ln in aes_out.splitlines() if ln.startswith("type"))
    row = next(ln for ln in aes_out.splitlines() if ln.lower().startswith("aes-128-gcm"))
    sizes = re.findall(r"(\d+) bytes", header)
    values = re.findall(r"([\d.]+)k", row)
    if "16384" not in sizes or len(values) != len(sizes):
        raise LoadError(f"openssl speed output not understood: {aes_out[-400:]!r}")
    kbps = float(values[sizes.index("16384")])  # 1000s of bytes per second
    m = re.search(r"nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", ec_out)
    if not m:
        raise LoadError(f"openssl speed ecdsap256 output not understood: {ec_out[-400:]!r}")
    return Speed(
        aes128gcm_16k_mbps=kbps / 1000.0,
        ecdsa_sign_per_s=float(m.group(1)),
        ecdsa_verify_per_s=float(m.group(2)),
        commands=(" ".join(aes[3:]), " ".join(ec[3:])),
    )


def settle(seconds: float) -> None:
    """Let a just-finished load's sockets close before the next measurement."""
    time.sleep(seconds)
