"""The composition root of ``meshproxy run`` (ARCHITECTURE section 8).

Order: config -> logging -> TLS backend -> measurement and quote provider -> key ->
activation (retried) -> the manifest's Files -> listeners -> the app -> ready -> supervise
-> exit with the app's status. Everything up to the Files blocks and runs before the event
loop; from the listeners on, one uvloop loop runs the data plane and the supervisor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop
from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy import __version__
from meshproxy._log import setup as setup_logging
from meshproxy.config import MarbleConfig, load_marble_config
from meshproxy.errors import PolicyError, UsageError
from meshproxy.pki import cert_to_pem, certs_to_pem, generate_key, key_to_pem, spiffe_id
from meshproxy.proxy import (
    AdminServer,
    ConnectionSet,
    InboundListener,
    InboundSpec,
    NativeInboundListener,
    NativeOutboundListener,
    OutboundListener,
    OutboundSpec,
    ProxyMetrics,
)
from meshproxy.proxy._h2native import ALPN as H2_ALPN
from meshproxy.proxy._h2native import NativeHttpInboundListener, uses_fast_path
from meshproxy.proxy.http import InboundHttp, OutboundHttp, RoutePolicy, resolve_routes, with_alpn
from meshproxy.runtime._activate import activate, quote_provider, write_files
from meshproxy.runtime._app import Supervisor, app_environment, become_subreaper
from meshproxy.tls import (
    NativeEngine,
    TLSIdentity,
    active_backend,
    client_context,
    describe_backend,
    native_client_context,
    native_server_context,
    select_backend,
    server_context,
)

if TYPE_CHECKING:
    from meshproxy.coordinator.client import Activation, MeshPolicy

log = logging.getLogger("meshproxy.runtime")

SHUTDOWN_GRACE = 10.0  # SIGTERM -> SIGKILL for the app
DRAIN_GRACE = 5.0  # open connections after the app exited


@dataclass(frozen=True)
class RunPlan:
    """Everything the event loop needs, decided before it starts."""

    config: MarbleConfig
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)  # holds the private key
    identity: TLSIdentity
    trust_domain: str
    allow: Mapping[str, tuple[str, ...]]  # inbound listener -> caller types
    shutdown_grace: float = SHUTDOWN_GRACE
    drain_grace: float = DRAIN_GRACE
    routes: Mapping[str, RoutePolicy] = field(default_factory=dict)  # http listener -> rules


def run(config_path: Path, app_argv: Sequence[str]) -> int:
    """``meshproxy run``: returns the app's exit status."""
    cfg = load_marble_config(config_path)
    setup_logging(cfg.log.level, cfg.log.format)
    log.info(
        "meshproxy run starting",
        extra={"event": "runtime.start", "version": __version__, "config": str(config_path),
               "marble_type": cfg.marble.type},
    )  # fmt: skip
    backend = select_backend()
    log.info("TLS backend", extra={"event": "tls.backend", "backend": backend,
                                   "detail": describe_backend()})  # fmt: skip
    provider = quote_provider(cfg)
    key = generate_key()
    activation = activate(cfg, key, provider)
    return execute(cfg, activation, key, app_argv)


def execute(
    cfg: MarbleConfig,
    activation: Activation,
    key: ec.EllipticCurvePrivateKey,
    app_argv: Sequence[str],
    *,
    shutdown_grace: float = SHUTDOWN_GRACE,
    drain_grace: float = DRAIN_GRACE,
) -> int:
    """Everything after activation: Files, listeners, the app, supervision."""
    plan = make_plan(cfg, activation, key, app_argv)
    plan = dataclasses.replace(plan, shutdown_grace=shutdown_grace, drain_grace=drain_grace)
    cfg.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(cfg.workdir, 0o700)
    write_files(cfg.files_root, activation.files)
    return uvloop.run(serve(plan))


def make_plan(
    cfg: MarbleConfig, activation: Activation, key: ec.EllipticCurvePrivateKey,
    app_argv: Sequence[str],
) -> RunPlan:  # fmt: skip
    argv = tuple(app_argv) or tuple(activation.argv)
    if not argv:
        raise UsageError(
            "no app to run: give it after '--' (meshproxy run --config FILE -- APP ARGV...) "
            f"or set Argv in the manifest's Parameters of marble {cfg.marble.type!r}"
        )
    identity = TLSIdentity(
        chain_pem=certs_to_pem([activation.leaf, activation.intermediate]),
        key_pem=key_to_pem(key),
        trust_pem=cert_to_pem(activation.intermediate),
    )
    ours = {
        "MESHPROXY_WORKDIR": str(cfg.workdir),
        "MESHPROXY_FILES_ROOT": str(cfg.files_root),
        **{f"MESHPROXY_INBOUND_{i.name.upper()}": str(cfg.inbound_socket(i.name))
           for i in cfg.inbound},
        **{f"MESHPROXY_OUTBOUND_{o.name.upper()}": str(cfg.outbound_socket(o.name))
           for o in cfg.outbound},
        "MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN": identity.chain_pem.decode(),
        "MARBLE_PREDEFINED_ROOT_CA": identity.trust_pem.decode(),
        "MARBLE_PREDEFINED_COORDINATOR_ROOT_CA": cert_to_pem(activation.root).decode(),
        # MarbleRun apps expect it; the app runs in the same enclave as this key.
        "MARBLE_PREDEFINED_PRIVATE_KEY": identity.key_pem.reveal().decode(),
    }  # fmt: skip
    return RunPlan(
        config=cfg,
        argv=argv,
        env=app_environment(os.environ, activation.env, ours),
        identity=identity,
        trust_domain=activation.mesh.trust_domain,
        allow=(allow := resolve_allow(cfg, activation.mesh)),
        routes=resolve_routes(cfg, activation.mesh, allow),
    )


def resolve_allow(cfg: MarbleConfig, mesh: MeshPolicy) -> dict[str, tuple[str, ...]]:
    """Caller types per ``marbles`` listener: the config may narrow the manifest, never widen."""
    manifest = tuple(mesh.callers_of(cfg.marble.type))
    out: dict[str, tuple[str, ...]] = {}
    for i, listener in enumerate(cfg.inbound):
        if listener.clients != "marbles":
            continue
        allowed = manifest if listener.allow is None else listener.allow
        extra = [t for t in allowed if t not in manifest]
        if extra:
            raise PolicyError(
                f"{cfg.source.name}: inbound[{i}] ({listener.name}): allow lists "
                f"{', '.join(extra)}, which the manifest's Mesh.Allow does not allow to call "
                f"{cfg.marble.type} (manifest allows: {', '.join(manifest) or 'none'}); "
                "refusing to start"
            )
        if not allowed:
            log.warning(
                "no marble type may call this listener; every connection will be refused",
                extra={"event": "inbound.no_callers", "listener": listener.name},
            )
        out[listener.name] = allowed
    return out


async def serve(plan: RunPlan) -> int:
    """Listeners, the app, readiness and supervision; returns the app's exit status."""
    cfg = plan.config
    connections = ConnectionSet()
    ready = False
    metrics = ProxyMetrics(tls_backend=active_backend())
    admin = AdminServer(cfg.admin_socket, ready=lambda: ready, metrics=metrics)
    engine = NativeEngine() if active_backend() == "native" else None  # tcp listeners' TLS
    if engine is not None:
        log.info("native TLS engine started", extra={"event": "tls.engine",
                                                      "threads": engine.threads})  # fmt: skip
    inbound, outbound = _listeners(plan, connections, metrics, engine)
    if not become_subreaper():
        log.warning("cannot become a child subreaper; orphans of the app may stay zombies",
                    extra={"event": "runtime.subreaper"})  # fmt: skip
    supervisor = Supervisor(plan.argv, plan.env, grace=plan.shutdown_grace)
    supervisor.install()
    try:
        await admin.start()
        bound = {li.spec.name: _hostport(*await li.start()) for li in inbound}
        sockets = {lo.spec.name: str(await lo.start()) for lo in outbound}
        for name, where in {**bound, **sockets}.items():
            log.info("listening", extra={"event": "listener.start", "listener": name,
                                         "address": where})  # fmt: skip
        pid = supervisor.start()
        if supervisor.terminating.done():
            supervisor.terminate()
        doc = {"inbound": bound, "outbound": sockets, "admin": str(cfg.admin_socket), "pid": pid}
        await asyncio.to_thread(_write_ready, cfg.ready_file, doc)
        if not supervisor.exited:
            ready = True
            log.info("ready", extra={"event": "runtime.ready", "pid": pid})
        waiter = asyncio.ensure_future(supervisor.wait())
        either: list[asyncio.Future[Any]] = [waiter, supervisor.terminating]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        ready = False
        for li in inbound:
            li.stop_accepting()
        for lo in outbound:
            lo.stop_accepting()
        code = await waiter
        dropped = await connections.drain(plan.drain_grace)
        log.info("exiting", extra={"event": "runtime.exit", "code": code, "dropped": dropped})
        return code
    finally:
        ready = False
        for li in inbound:
            li.stop_accepting()
        for lo in outbound:
            lo.stop_accepting()
        if supervisor.pid and not supervisor.exited:
            supervisor.terminate()  # an error after the start: do not leave the app behind
            await supervisor.wait()
        supervisor.uninstall()
        await admin.close()
        if engine is not None:
            await engine.aclose()  # after the drain: ends what the grace period left open
        cfg.ready_file.unlink(missing_ok=True)


def _listeners(
    plan: RunPlan,
    connections: ConnectionSet,
    metrics: ProxyMetrics | None = None,
    engine: NativeEngine | None = None,
) -> tuple[
    list[InboundListener | NativeInboundListener], list[OutboundListener | NativeOutboundListener]
]:  # NativeHttpInboundListener is a NativeInboundListener
    cfg = plan.config
    mtls = public = None
    inbound: list[InboundListener | NativeInboundListener] = []
    for i in cfg.inbound:
        if i.clients == "marbles":
            mtls = mtls or server_context(plan.identity, client_auth=True)
            ctx = mtls
        else:
            public = public or server_context(plan.identity, client_auth=False)
            ctx = public
        http = None
        if i.protocol != "tcp":  # its own context: it selects ALPN h2 (or http/1.1)
            alpn = ("h2",) if i.protocol == "hbone" else ("h2", "http/1.1")
            ctx = with_alpn(server_context(plan.identity, client_auth=i.clients == "marbles"), alpn)
            our_id = spiffe_id(plan.trust_domain, cfg.marble.type)
            http = InboundHttp(
                i.app_protocol, our_id, plan.routes.get(i.name, RoutePolicy()),
                mode=i.protocol, proxy_protocol=i.proxy_protocol == "v2",
            )  # fmt: skip
        spec = InboundSpec(
            name=i.name, host=i.listen.host, port=i.listen.port, clients=i.clients,
            allow=plan.allow.get(i.name, ()), trust_domain=plan.trust_domain,
            app_socket=cfg.inbound_socket(i.name), http=http,
            proxy_protocol=i.proxy_protocol == "v2" and i.protocol == "tcp",
        )  # fmt: skip
        if engine is not None and uses_fast_path(http, engine):  # h2 -> h2c in C (proxy/_h2native)
            nctx = native_server_context(
                plan.identity, client_auth=i.clients == "marbles", alpn=H2_ALPN
            )
            inbound.append(NativeHttpInboundListener(spec, nctx, engine, connections, metrics))
            continue
        if engine is not None and http is None:  # protocol tcp: the C engine relays it
            nctx = native_server_context(plan.identity, client_auth=i.clients == "marbles")
            inbound.append(NativeInboundListener(spec, nctx, engine, connections, metrics))
            continue
        inbound.append(InboundListener(spec, ctx, connections, metrics))
    client = client_context(plan.identity) if cfg.outbound else None
    offers = {p: client_context(plan.identity, alpn=(p,)) for p in ("h2", "http/1.1")}
    native_client = native_client_context(plan.identity) if engine and cfg.outbound else None
    outbound: list[OutboundListener | NativeOutboundListener] = []
    for o in cfg.outbound:
        assert client is not None
        spec_out = OutboundSpec(
            name=o.name, socket_path=cfg.outbound_socket(o.name), host=o.upstream.host,
            port=o.upstream.port, sni=o.sni, peer=o.peer, trust_domain=plan.trust_domain,
            http=OutboundHttp(offers, mode=o.protocol) if o.protocol != "tcp" else None,
        )  # fmt: skip
        if native_client is not None and engine is not None and spec_out.http is None:
            outbound.append(NativeOutboundListener(spec_out, native_client, engine,
                                                   connections, metrics))  # fmt: skip
            continue
        outbound.append(OutboundListener(spec_out, client, connections, metrics))
    return inbound, outbound


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_ready(path: Path, doc: Mapping[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    os.replace(tmp, path)
