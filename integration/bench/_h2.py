"""The ``h2`` scenario: HTTP/2 over TLS through one proxy to an h2c app (issue 4).

``h2load -c10 -m10`` (10 connections x 10 concurrent streams, 100-byte responses, ALPN
h2, no client certificate) against:

* ``meshproxy-py`` / ``meshproxy-native``: one ``protocol: http`` inbound listener,
  ``clients: public``, ``app_protocol: h2c``, to its app (nginx serving h2c on the Unix
  socket meshproxy assigns; pinned to CPU 0);
* ``nginx``: an HTTP/2 TLS reverse proxy (``listen ... ssl http2``) that relays to the
  same kind of backend over HTTP/2 too (``grpc_pass``: nginx's only HTTP/2 upstream
  client; it speaks plain h2c and needs no gRPC), with upstream keep-alive.

The backend is the same program and config for everyone: nginx with ``listen unix:...
http2`` (h2c prior knowledge), one worker on CPU 0, ``return 200`` with 100 bytes. The
proxy runs on CPU 1, h2load on CPU 0. Latency percentiles come from h2load's per-request
log (``--log-file``), since h2load prints only min/max/mean. The result row is
``h2-requests``: ``req_per_s_wall``, ``req_per_cpu_s``, ``p50_ms``, ``p99_ms``, ``errors``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from integration.bench import _loads as loads
from integration.bench._candidates import BODY, Context, _nginx, _user_line
from integration.bench._procs import Meter, Proc, accepts, children, wait_children, wait_until
from integration.harness import free_port

if TYPE_CHECKING:
    from integration.bench.run import Runner

SCENARIO = "h2-requests"
CANDIDATES = ("meshproxy-py", "meshproxy-native", "nginx")
CONNS, STREAMS = 10, 10

H2C_BACKEND = Template("""\
# The h2c app of the h2 scenario: nginx answering HTTP/2 prior knowledge on a Unix socket.
$user
worker_processes 1;
daemon off;
pid $prefix/nginx.pid;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    http2_max_concurrent_streams 128;
    default_type text/plain;
    client_body_temp_path $prefix/tmp-body;
    proxy_temp_path $prefix/tmp-proxy;
    fastcgi_temp_path $prefix/tmp-fastcgi;
    uwsgi_temp_path $prefix/tmp-uwsgi;
    scgi_temp_path $prefix/tmp-scgi;
    server {
        listen unix:$sock http2;
        location / { return 200 "$body"; }
    }
}
""")

NGINX_H2_PROXY = Template("""\
# nginx as the h2 candidate: HTTP/2 over TLS in, HTTP/2 (h2c) to the app.
$user
worker_processes $workers;
daemon off;
pid $prefix/nginx.pid;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $prefix/tmp-body;
    proxy_temp_path $prefix/tmp-proxy;
    fastcgi_temp_path $prefix/tmp-fastcgi;
    uwsgi_temp_path $prefix/tmp-uwsgi;
    scgi_temp_path $prefix/tmp-scgi;
    upstream h2app { server unix:$sock; keepalive 64; }
    server {
        listen $listen ssl http2;
        ssl_protocols TLSv1.3;
        ssl_certificate $chain;
        ssl_certificate_key $key;
        location / { grpc_pass grpc://h2app; }
    }
}
""")


def h2c_backend_conf(prefix: Path, sock: Path) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(H2C_BACKEND.substitute(user=_user_line(), prefix=prefix, sock=sock, body=BODY))
    return conf


def _ready(ctx: Context, proc: Proc, address: str, name: str) -> None:
    try:
        wait_until(lambda: accepts(address), 30, f"{name} on {address}", proc)
    except BaseException:
        ctx.procs.stop(proc)
        raise


# -- candidates ------------------------------------------------------------------------------
class H2Server:
    def __init__(
        self, name: str, procs: list[Proc], address: str, pids: Callable[[], list[int]]
    ) -> None:
        self.name = name
        self.procs = procs
        self.address = address
        self.proxy_pids = pids  # read at each measurement: nginx forks its workers late


def start_nginx_h2(ctx: Context) -> H2Server:
    """The shared h2c backend and nginx in front of it (both stopped with the server)."""
    base = ctx.work / "h2-nginx"
    sock = base / "app.sock"
    backend_conf = h2c_backend_conf(base / "backend", sock)
    backend = ctx.procs.spawn("h2-backend-nginx", _nginx("0", backend_conf, base / "backend"))
    _ready(ctx, backend, f"unix:{sock}", "h2c backend")
    listen = f"127.0.0.1:{free_port()}"
    prefix = base / "proxy"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_H2_PROXY.substitute(
            user=_user_line(), workers=1, prefix=prefix, sock=sock, listen=listen,
            chain=ctx.certs.server_chain, key=ctx.certs.server_key,
        )
    )  # fmt: skip
    proc = ctx.procs.spawn("h2-nginx-proxy", _nginx(loads.PROXY_CPU, conf, prefix),
                           env=ctx.peer_env())  # fmt: skip
    try:
        _ready(ctx, proc, listen, "nginx h2 proxy")
        wait_children(proc.pid, 1)
    except BaseException:
        ctx.procs.stop(backend)
        raise
    return H2Server("nginx", [proc, backend], listen, lambda: [proc.pid, *children(proc.pid)])


def start_meshproxy_h2(ctx: Context, runner: Runner, native: str) -> H2Server:
    name = "meshproxy-native" if native == "require" else "meshproxy-py"
    marble = ctx.work / f"h2-{name}"
    inbound = [{"name": "h2", "listen": "127.0.0.1:0", "clients": "public",
                "protocol": "http", "app_protocol": "h2c"}]  # fmt: skip
    config = runner.mesh.marble_config(marble, inbound)
    workdir = marble / "run"
    sock = workdir / "inbound-h2.sock"
    backend_conf = h2c_backend_conf(marble / "backend", sock)
    (workdir / "ready.json").unlink(missing_ok=True)
    app = ["taskset", "-c", loads.LOAD_CPU, "nginx", "-c", str(backend_conf),
           "-p", str(marble / "backend"), "-e", str(marble / "backend" / "error.log")]  # fmt: skip
    env = {**runner.mesh.env, "MESHPROXY_NATIVE": native, "PYTHONUNBUFFERED": "1"}
    argv = ["taskset", "-c", loads.PROXY_CPU, sys.executable, "-m", "meshproxy", "run",
            "--config", str(config), "--", *app]  # fmt: skip
    proc = ctx.procs.spawn(f"h2-{name}", argv, env=env, cwd=marble)
    try:
        wait_until(lambda: (workdir / "ready.json").exists(), 60, f"{name} ready.json", proc)
        address = json.loads((workdir / "ready.json").read_text())["inbound"]["h2"]
        wait_until(lambda: accepts(f"unix:{sock}"), 30, f"{name}'s h2c app", proc)
    except BaseException:
        ctx.procs.stop(proc)
        raise
    _ready(ctx, proc, address, name)
    return H2Server(name, [proc], address, lambda: [proc.pid])


# -- the load --------------------------------------------------------------------------------
def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        raise loads.LoadError("h2load logged no request")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def h2load(address: str, seconds: int, log_file: Path) -> dict[str, float]:
    """h2load for ``seconds`` (after 1 s of warm-up): req/s, percentiles, errors."""
    argv = ["taskset", "-c", loads.LOAD_CPU, "h2load", "-c", str(CONNS), "-m", str(STREAMS),
            "-t", "1", "-D", str(seconds), "--warm-up-time=1", f"--log-file={log_file}",
            f"https://{address}/"]  # fmt: skip
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                             stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise loads.LoadError(f"h2load: no result within {seconds + 60} s") from None
    out = res.stdout
    done = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored, (\d+) timeout", out, re.M)  # fmt: skip
    rate = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    if res.returncode != 0 or not (done and rate and codes):
        raise loads.LoadError(f"h2load exited {res.returncode}: {(out + res.stderr)[-600:]!r}")
    latencies: list[float] = []
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            latencies.append(int(parts[2]) / 1000.0)  # microseconds -> ms
    latencies.sort()
    log_file.unlink(missing_ok=True)
    succeeded = int(done.group(4))
    errors = int(done.group(5)) + int(done.group(6)) + int(done.group(7))
    errors += sum(int(codes.group(i)) for i in (2, 3, 4))
    if succeeded == 0:
        raise loads.LoadError(f"h2load: no request succeeded: {out[-600:]!r}")
    return {
        "requests": float(succeeded),
        "req_per_s": float(rate.group(3)),
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "errors": float(errors),
    }


def _measure(runner: Runner, server: H2Server) -> None:
    seconds = runner.plan.sizes.wrk_seconds
    log_file = runner.ctx.work / "h2load.log"

    def once() -> tuple[dict[str, float], Meter]:
        with Meter(server.proxy_pids) as m:
            r = h2load(server.address, seconds, log_file)
        # The meter also spans h2load's warm-up second; count those requests' CPU too
        # by scaling with the measured rate over the whole metered wall time.
        cpu_rate = r["req_per_s"] * m.wall_s / max(m.cpu_s, 0.01)
        metrics = {
            "req_per_s_wall": r["req_per_s"],
            "req_per_cpu_s": cpu_rate,
            "p50_ms": r["p50_ms"],
            "p99_ms": r["p99_ms"],
            "errors": r["errors"],
        }
        return metrics, m

    runner.samples.add(SCENARIO, server.name, 1, runner.scenarios._measure(once))


def run_h2(runner: Runner) -> None:
    """Every repetition: each candidate in turn started, measured, stopped."""
    names = [n for n in CANDIDATES if n in runner.plan.candidates]
    if "meshproxy-native" in names and (runner.native_api or 0) < 1:
        names.remove("meshproxy-native")
    ctx = runner.ctx
    starters = {
        "meshproxy-py": lambda: start_meshproxy_h2(ctx, runner, "off"),
        "meshproxy-native": lambda: start_meshproxy_h2(ctx, runner, "require"),
        "nginx": lambda: start_nginx_h2(ctx),
    }
    for rep in range(runner.plan.reps):
        for name in names:
            runner.progress(f"rep {rep + 1}/{runner.plan.reps}: {name}: h2 (h2load)")
            runner.scenarios.quiet()
            try:
                server = starters[name]()
            except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
                runner.results.problem(SCENARIO, name, "start", f"failed to start: {exc}")
                continue
            try:
                _measure(runner, server)
            except (loads.LoadError, RuntimeError, OSError) as exc:
                runner.results.problem(SCENARIO, name, "error", f"failed: {exc}")
                print(f"bench: {name} h2 failed: {exc}", file=sys.stderr, flush=True)
            finally:
                for proc in server.procs:
                    ctx.procs.stop(proc)
            loads.settle(0.5)
    runner.results.notes.append(
        f"h2: h2load -c{CONNS} -m{STREAMS} -t1 (ALPN h2, no client certificate) through one "
        "listener to nginx serving h2c on a Unix socket (CPU 0); meshproxy: protocol http, "
        "clients public, app_protocol h2c; nginx: listen ssl http2 + grpc_pass (HTTP/2 to "
        "the app), upstream keepalive; p50/p99 from h2load's per-request log"
    )
