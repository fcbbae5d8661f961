"""The candidates and the backends: configs, start (pinned), readiness, who counts as proxy.

Every candidate gets the same three listeners on 127.0.0.1 and the same backends over Unix
sockets (every candidate here can use one, so none needs TCP to its backend):
  bulk  mTLS in  -> the C sink                              (scenario bulk)
  webm  mTLS in  -> the HTTP backend, 100-byte responses    (handshakes, memory)
  web   TLS in, no client certificate -> the HTTP backend   (requests: wrk cannot present
                                                              a cert)
The HTTP backend is the C responder clients/httpd.c (default) or, with --http-backend
nginx, nginx with the same answer; the one chosen serves every candidate.
Proxy configs follow perf-anchors.md: one worker/thread per core given, TLS 1.3 only,
access logs off, default buffers. meshproxy sends no TLS 1.3 session tickets; the C peers
send OpenSSL's default two (about a third of a handshake's server CPU, per the anchors),
and switching tickets off in their own configs (no-tls-tickets, ssl_session_tickets off,
NO_TICKET) still leaves OpenSSL sending two stateful ones (measured here). So they run with
an OpenSSL config whose system default is ``NumTickets = 0``: the same server work per
handshake for everyone. The handshake client counts the tickets it receives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from string import Template

from integration.bench._pki import BenchMesh, CertFiles
from integration.bench._procs import (
    Proc,
    Processes,
    accepts,
    children,
    wait_children,
    wait_until,
)
from integration.harness import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BODY = "x" * 100  # the 100-byte response body
HTTP_BACKENDS = ("httpd", "nginx")  # the C responder (clients/httpd.c), or nginx
# The HTTP backend's scheduling policy on CPU 0: the normal one, or SCHED_BATCH (no wake-up
# preemption of the load client it shares the core with: cheaper per request, but answers
# come in bursts, which changes the proxies' work too). README "Backends".
BACKEND_SCHEDS = ("normal", "batch")
LIFETIME_S = 4 * 3600  # upper bound on any backend's life (the C sink's alarm)


OPENSSL_NO_TICKETS = """\
# The C peers' OpenSSL config in the bench: as meshproxy, send no TLS 1.3 session tickets.
openssl_conf = bench_conf
[bench_conf]
ssl_conf = bench_ssl
[bench_ssl]
system_default = bench_tls
[bench_tls]
NumTickets = 0
"""


@dataclass(frozen=True)
class Listeners:
    bulk: str
    webm: str
    web: str


@dataclass
class Server:
    """A running candidate: its process (group), listeners, and which pids are the proxy."""

    name: str
    proc: Proc
    listeners: Listeners
    proxy_pids: Callable[[], list[int]]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Context:
    """What every candidate needs to start."""

    procs: Processes
    certs: CertFiles
    bin_dir: Path
    work: Path
    sink_sock: Path
    web_sock: Path
    http_backend: str = "httpd"  # one of HTTP_BACKENDS, the same for every candidate
    backend_sched: str = "normal"  # one of BACKEND_SCHEDS, the same for every candidate

    def peer_env(self) -> dict[str, str]:
        """The environment of haproxy, nginx and stunnel: no session tickets (see above)."""
        conf = self.work / "openssl-no-tickets.cnf"
        if not conf.exists():
            conf.write_text(OPENSSL_NO_TICKETS)
        return {**os.environ, "OPENSSL_CONF": str(conf)}


def _listeners() -> Listeners:
    return Listeners(*(f"127.0.0.1:{free_port()}" for _ in range(3)))


def _port(address: str) -> str:
    return address.rpartition(":")[2]


def _wait_listening(ctx: Context, server: Server, timeout: float = 30) -> Server:
    """The server once all its listeners accept; stopped again if they do not."""
    try:
        for addr in (server.listeners.bulk, server.listeners.webm, server.listeners.web):
            wait_until(partial(accepts, addr), timeout, f"{server.name} on {addr}", server.proc)
    except BaseException:
        ctx.procs.stop(server.proc)
        raise
    return server


def _nginx(cores: str, conf: Path, prefix: Path) -> list[str]:
    return ["taskset", "-c", cores, "nginx", "-c", str(conf), "-p", str(prefix),
            "-e", str(prefix / "error.log")]  # fmt: skip


def _user_line() -> str:
    # nginx workers default to 'nobody', which cannot enter the bench's 0700 temp dirs.
    return "user root;" if os.geteuid() == 0 else ""


# -- backends -----------------------------------------------------------------------------
NGINX_BACKEND = Template("""\
# nginx as the HTTP backend: 100-byte responses on Unix sockets, one worker (CPU 0).
$user
worker_processes 1;
daemon off;
pid $prefix/nginx.pid;
events { worker_connections 16384; }
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_header_timeout 300s;
    default_type text/plain;
    client_body_temp_path $prefix/tmp-body;
    proxy_temp_path $prefix/tmp-proxy;
    fastcgi_temp_path $prefix/tmp-fastcgi;
    uwsgi_temp_path $prefix/tmp-uwsgi;
    scgi_temp_path $prefix/tmp-scgi;
    server {
$listens
        location / { return 200 "$body"; }
    }
}
""")


def nginx_backend_conf(prefix: Path, sockets: list[Path]) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    listens = "\n".join(f"        listen unix:{s};" for s in sockets)
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_BACKEND.substitute(user=_user_line(), prefix=prefix, listens=listens, body=BODY)
    )
    return conf


def http_backend_argv(ctx: Context, prefix: Path, sockets: list[Path]) -> list[str]:
    """The HTTP backend (100-byte answers) on these Unix sockets, pinned to CPU 0, with the
    scheduling policy chosen (chrt -b: SCHED_BATCH)."""
    pin = ["taskset", "-c", "0", *(["chrt", "-b", "0"] if ctx.backend_sched == "batch" else [])]
    if ctx.http_backend == "nginx":
        conf = nginx_backend_conf(prefix, sockets)
        return [*pin, "nginx", "-c", str(conf), "-p", str(prefix), "-e", str(prefix / "error.log")]
    return [*pin, str(ctx.bin_dir / "httpd"), str(LIFETIME_S), *(f"unix:{s}" for s in sockets)]


def start_backends(ctx: Context) -> None:
    """The shared sink and HTTP backend of haproxy, nginx and stunnel, on CPU 0."""
    sink = ctx.procs.spawn(
        "backend-sink",
        ["taskset", "-c", "0", str(ctx.bin_dir / "sink"), f"unix:{ctx.sink_sock}", str(LIFETIME_S)],
    )
    argv = http_backend_argv(ctx, ctx.work / "http-backend", [ctx.web_sock])
    web = ctx.procs.spawn(f"backend-{ctx.http_backend}", argv)
    wait_until(lambda: accepts(f"unix:{ctx.sink_sock}"), 15, "sink backend", sink)
    wait_until(lambda: accepts(f"unix:{ctx.web_sock}"), 15, f"{ctx.http_backend} backend", web)


# -- haproxy ------------------------------------------------------------------------------
HAPROXY = Template("""\
global
    nbthread $threads
    maxconn 8000
    ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend bulk
    bind $bulk ssl crt $pem ca-file $ca verify required
    default_backend sink
frontend webm
    bind $webm ssl crt $pem ca-file $ca verify required
    default_backend web
frontend web
    bind $web ssl crt $pem
    default_backend web
backend sink
    server sink unix@$sink
backend web
    server web unix@$websock
""")


def start_haproxy(ctx: Context, cores: str, threads: int) -> Server:
    lis = _listeners()
    conf = ctx.work / f"haproxy-{threads}.cfg"
    conf.write_text(
        HAPROXY.substitute(
            threads=threads,
            bulk=lis.bulk,
            webm=lis.webm,
            web=lis.web,
            pem=ctx.certs.server_combined,
            ca=ctx.certs.ca_chain,
            sink=ctx.sink_sock,
            websock=ctx.web_sock,
        )
    )
    argv = ["taskset", "-c", cores, "haproxy", "-db", "-f", str(conf)]
    proc = ctx.procs.spawn(f"haproxy-{threads}", argv, env=ctx.peer_env())
    return _wait_listening(ctx, Server("haproxy", proc, lis, lambda: [proc.pid]))


# -- nginx --------------------------------------------------------------------------------
NGINX_PROXY = Template("""\
# nginx as the candidate: stream {} terminates TLS for bulk and webm, http {} proxies web.
$user
worker_processes $workers;
daemon off;
pid $prefix/nginx.pid;
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
events { worker_connections 16384; }
stream {
    ssl_protocols TLSv1.3;
    ssl_certificate $chain;
    ssl_certificate_key $key;
    ssl_verify_client on;
    ssl_client_certificate $ca;
    ssl_verify_depth 2;
    server { listen $bulk ssl; proxy_pass unix:$sink; }
    server { listen $webm ssl; proxy_pass unix:$websock; }
}
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $prefix/tmp-body;
    proxy_temp_path $prefix/tmp-proxy;
    fastcgi_temp_path $prefix/tmp-fastcgi;
    uwsgi_temp_path $prefix/tmp-uwsgi;
    scgi_temp_path $prefix/tmp-scgi;
    upstream web { server unix:$websock; keepalive 64; }
    server {
        listen $web ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate $chain;
        ssl_certificate_key $key;
            location / {
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
""")


def start_nginx(ctx: Context, cores: str, threads: int) -> Server:
    lis = _listeners()
    prefix = ctx.work / f"nginx-proxy-{threads}"
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        NGINX_PROXY.substitute(
            user=_user_line(),
            workers=threads,
            prefix=prefix,
            bulk=lis.bulk,
            webm=lis.webm,
            web=lis.web,
            chain=ctx.certs.server_chain,
            key=ctx.certs.server_key,
            ca=ctx.certs.ca_chain,
            sink=ctx.sink_sock,
            websock=ctx.web_sock,
        )
    )
    proc = ctx.procs.spawn(
        f"nginx-proxy-{threads}", _nginx(cores, conf, prefix), env=ctx.peer_env()
    )
    server = Server("nginx", proc, lis, lambda: [proc.pid, *children(proc.pid)])
    server.notes.append("nginx: stream {} for bulk/handshakes/memory, http {} proxy for requests")
    server = _wait_listening(ctx, server)
    wait_children(proc.pid, threads)
    return server


# -- stunnel ------------------------------------------------------------------------------
STUNNEL = Template("""\
foreground = yes
pid =
output = $log
debug = 4
socket = l:TCP_NODELAY=1

[bulk]
accept = $bulk
connect = $sink
cert = $chain
key = $key
CAfile = $ca
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3

[webm]
accept = $webm
connect = $websock
cert = $chain
key = $key
CAfile = $ca
verifyChain = yes
requireCert = yes
sslVersionMin = TLSv1.3

[web]
accept = $web
connect = $websock
cert = $chain
key = $key
sslVersionMin = TLSv1.3
""")


def start_stunnel(ctx: Context, cores: str, threads: int) -> Server:
    lis = _listeners()
    conf = ctx.work / f"stunnel-{threads}.conf"
    conf.write_text(
        STUNNEL.substitute(
            log=ctx.work / f"stunnel-{threads}.out",
            bulk=lis.bulk,
            webm=lis.webm,
            web=lis.web,
            chain=ctx.certs.server_chain,
            key=ctx.certs.server_key,
            ca=ctx.certs.ca_chain,
            sink=ctx.sink_sock,
            websock=ctx.web_sock,
        )
    )
    argv = ["taskset", "-c", cores, "stunnel4", str(conf)]
    proc = ctx.procs.spawn(f"stunnel-{threads}", argv, env=ctx.peer_env())
    server = Server("stunnel", proc, lis, lambda: [proc.pid])
    server.notes.append(
        "stunnel: one thread per connection (its only model); cores given by taskset"
    )
    return _wait_listening(ctx, server)


# -- meshproxy ----------------------------------------------------------------------------
def native_engine_api() -> int | None:
    """ENGINE_API of meshproxy._native_tls, in a fresh interpreter (None: not importable)."""
    res = subprocess.run(
        [sys.executable, "-c", "import meshproxy._native_tls as n; print(n.ENGINE_API)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    try:
        return int(res.stdout.strip()) if res.returncode == 0 else None
    except ValueError:
        return None


def start_meshproxy(
    ctx: Context, mesh: BenchMesh, cores: str, threads: int, *, native: str
) -> Server:
    name = "meshproxy-native" if native == "require" else "meshproxy-py"
    marble = ctx.work / f"{name}-{threads}"
    inbound = [
        {"name": "bulk", "listen": "127.0.0.1:0", "clients": "marbles"},
        {"name": "webm", "listen": "127.0.0.1:0", "clients": "marbles"},
        {"name": "web", "listen": "127.0.0.1:0", "clients": "public"},
    ]
    config = mesh.marble_config(marble, inbound)
    workdir = marble / "run"
    web = http_backend_argv(
        ctx, marble / "http-backend", [workdir / "inbound-web.sock", workdir / "inbound-webm.sock"]
    )
    (workdir / "ready.json").unlink(missing_ok=True)
    app = ["sh", str(HERE / "app.sh"), str(ctx.bin_dir / "sink"), str(LIFETIME_S), *web]
    env = {**mesh.env, "MESHPROXY_NATIVE": native, "PYTHONUNBUFFERED": "1"}
    meshproxy = [sys.executable, "-m", "meshproxy", "run", "--config", str(config)]
    argv = ["taskset", "-c", cores, *meshproxy, "--", *app]
    proc = ctx.procs.spawn(f"{name}-{threads}", argv, env=env, cwd=marble)
    try:
        wait_until(lambda: (workdir / "ready.json").exists(), 60, f"{name} ready.json", proc)
        ready = json.loads((workdir / "ready.json").read_text())["inbound"]
        for sock in ("inbound-bulk.sock", "inbound-web.sock", "inbound-webm.sock"):
            what = f"{name}'s app on {sock}"
            wait_until(partial(accepts, f"unix:{workdir / sock}"), 30, what, proc)
    except BaseException:
        ctx.procs.stop(proc)
        raise
    lis = Listeners(ready["bulk"], ready["webm"], ready["web"])
    # Only the `meshproxy run` process (all its threads) is the proxy; its app is the backend.
    server = Server(name, proc, lis, lambda: [proc.pid])
    model = (
        "require fails closed, so this row is the native engine or no row at all; its C "
        "workers, one thread per CPU given by taskset, accept, handshake and relay, and "
        "Python's event loop only hears of each connection"
        if native == "require"
        else "stdlib ssl on one uvloop event loop"
    )
    server.notes.append(
        f"{name}: MESHPROXY_NATIVE={native} ({model}); proxy CPU = the `meshproxy run` "
        "process with all its threads; log level warning (per-connection info lines off, "
        "like the C peers' access logs)"
    )
    return _wait_listening(ctx, server)
