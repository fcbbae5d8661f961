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
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import uvloop

from meshproxy import __version__
from meshproxy._log import setup as setup_logging
from meshproxy.config import MarbleConfig, load_marble_config
from meshproxy.config._marble import InboundConfig, OutboundConfig
from meshproxy.errors import PolicyError, UsageError
from meshproxy.pki import spiffe_id
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
from meshproxy.runtime import _agent
from meshproxy.runtime._activated import Activated, AgentRenewal, MeshView, Renewal
from meshproxy.runtime._app import Supervisor, app_environment, become_subreaper
from meshproxy.runtime._renew import Lease, Renewed, Renewer
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
    from cryptography.hazmat.primitives.asymmetric import ec

    from meshproxy._native_tls import Context
    from meshproxy.coordinator.client import Activation, MeshPolicy
    from meshproxy.proxy.http import RoutePolicy

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


def _speaks_http(cfg: MarbleConfig) -> bool:
    """Whether any listener needs the HTTP layer (h2, h11), which is loaded only then."""
    return any(i.protocol != "tcp" for i in cfg.inbound) or any(
        o.protocol != "tcp" for o in cfg.outbound
    )


def run(
    config_path: Path,
    app_argv: Sequence[str],
    *,
    pending: _agent.Pending | None = None,
    cfg: MarbleConfig | None = None,
) -> int:
    """``meshproxy run``: returns the app's exit status. ``pending``: the agent, started
    by the caller before this module was even imported (``cli.run``), with ``cfg``, the
    config it loaded (and set up logging for) then."""
    if cfg is None:
        cfg = load_marble_config(config_path)
        setup_logging(cfg.log.level, cfg.log.format)
    pending = pending or _agent.begin_activation(config_path, cfg)
    try:
        return _run(config_path, cfg, app_argv, pending)
    finally:
        pending.cancel()  # a no-op once it answered


def _run(
    config_path: Path, cfg: MarbleConfig, app_argv: Sequence[str], pending: _agent.Pending
) -> int:
    log.info(
        "meshproxy run starting",
        extra={"event": "runtime.start", "version": __version__, "config": str(config_path),
               "marble_type": cfg.marble.type},
    )  # fmt: skip
    backend = select_backend()
    log.info("TLS backend", extra={"event": "tls.backend", "backend": backend,
                                   "detail": describe_backend()})  # fmt: skip
    # Attesting (cryptography, the attestation package, the coordinator client) runs in
    # the short-lived agent, so none of it stays in this long-lived process (_agent).
    # The agent also writes the manifest's Files.
    activated = _agent.activate(config_path, cfg.coordinator.activation_timeout, pending=pending)
    if cfg.attestation.provider == "gramine":
        _install_sealing_key(cfg, activated)
    plan = plan_of(cfg, activated, app_argv)
    source = AgentRenewal(
        config_path, activated.uuid, activated.root_pem, cfg.coordinator.address.host,
        cfg.coordinator.address.port,
    )  # fmt: skip
    return uvloop.run(serve(plan, (source, activated.lease)))


def _install_sealing_key(cfg: MarbleConfig, activated: Activated) -> None:
    """Gramine's encrypted mounts get the marble's sealing key in this process, the app's
    parent; the agent installed it in its own (another enclave process under Gramine)."""
    from meshproxy.attestation import SEAL_KEY_NAME, GramineProvider, provider_for
    from meshproxy.errors import CoordinatorError

    if activated.sealing_key is None:
        raise CoordinatorError(
            "the coordinator sent no sealing key for this marble's Gramine encrypted mounts; "
            "upgrade the coordinator"
        )
    provider = provider_for("gramine", device_root=cfg.attestation.device_dir)
    assert isinstance(provider, GramineProvider)
    path = provider.install_key(SEAL_KEY_NAME, activated.sealing_key)
    log.info("sealing key installed", extra={"event": "attestation.sealing_key",
                                             "path": str(path)})  # fmt: skip


def execute(
    cfg: MarbleConfig,
    activation: Activation,
    key: ec.EllipticCurvePrivateKey,
    app_argv: Sequence[str],
    *,
    shutdown_grace: float = SHUTDOWN_GRACE,
    drain_grace: float = DRAIN_GRACE,
) -> int:
    """Everything after an in-process activation: Files, listeners, the app, supervision
    (no renewal: ``run`` renews through the agent)."""
    from meshproxy.runtime._activate import write_files

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
    """The plan of an activation made in this process (``coordinator.client.Activation``)."""
    from meshproxy.pki import cert_to_pem, certs_to_pem, key_to_pem
    from meshproxy.runtime._renew import lease_of

    identity = TLSIdentity(
        chain_pem=certs_to_pem([activation.leaf, activation.intermediate]),
        key_pem=key_to_pem(key),
        trust_pem=cert_to_pem(activation.intermediate),
    )
    mesh = activation.mesh
    activated = Activated(
        uuid=activation.uuid, identity=identity, root_pem=cert_to_pem(activation.root),
        files=activation.files, env=activation.env, argv=activation.argv,
        mesh=MeshView(mesh.trust_domain, mesh.allow, {k: tuple(
            {"path": r.path, "path_prefix": r.path_prefix, "methods": r.methods,
             "allow": r.allow} for r in rules) for k, rules in mesh.routes.items()}),
        lease=lease_of(activation.leaf, activation.intermediate), simulated=activation.simulated,
    )  # fmt: skip
    return plan_of(cfg, activated, app_argv)


def plan_of(cfg: MarbleConfig, activated: Activated, app_argv: Sequence[str]) -> RunPlan:
    """Everything the event loop needs from the config, the activation and the command."""
    activation = activated
    argv = tuple(app_argv) or tuple(activation.argv)
    if not argv:
        raise UsageError(
            "no app to run: give it after '--' (meshproxy run --config FILE -- APP ARGV...) "
            f"or set Argv in the manifest's Parameters of marble {cfg.marble.type!r}"
        )
    identity = activated.identity
    ours = {
        "MESHPROXY_WORKDIR": str(cfg.workdir),
        "MESHPROXY_FILES_ROOT": str(cfg.files_root),
        **{f"MESHPROXY_INBOUND_{i.name.upper()}": str(cfg.inbound_socket(i.name))
           for i in cfg.inbound},
        **{f"MESHPROXY_OUTBOUND_{o.name.upper()}": str(cfg.outbound_socket(o.name))
           for o in cfg.outbound},
        "MARBLE_PREDEFINED_MARBLE_CERTIFICATE_CHAIN": identity.chain_pem.decode(),
        "MARBLE_PREDEFINED_ROOT_CA": identity.trust_pem.decode(),
        "MARBLE_PREDEFINED_COORDINATOR_ROOT_CA": activated.root_pem.decode(),
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
        routes=_routes(cfg, activation.mesh, allow),
    )


def _routes(
    cfg: MarbleConfig, mesh: MeshView, allow: Mapping[str, tuple[str, ...]]
) -> dict[str, RoutePolicy]:
    if not _speaks_http(cfg):
        return {}
    from meshproxy.proxy.http import resolve_routes

    return resolve_routes(cfg, mesh, allow)


def resolve_allow(cfg: MarbleConfig, mesh: MeshPolicy | MeshView) -> dict[str, tuple[str, ...]]:
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


async def serve(plan: RunPlan, renewal: tuple[AgentRenewal, Lease] | None = None) -> int:
    """Listeners, the app, readiness and supervision; returns the app's exit status."""
    cfg = plan.config
    connections = ConnectionSet()
    state = _Serving(plan)
    metrics = ProxyMetrics(tls_backend=active_backend())
    admin = AdminServer(cfg.admin_socket, ready=lambda: state.ready, metrics=metrics)
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
    renewer: asyncio.Task[None] | None = None
    try:
        await admin.start()
        await state.open(inbound, outbound)
        pid = supervisor.start()
        if supervisor.terminating.done():
            supervisor.terminate()
        state.doc["pid"] = pid
        # A few hundred bytes in the workdir: written here, not in a thread (starting the
        # executor's first thread costs more than the write).
        _write_ready(cfg.ready_file, state.doc)
        if not supervisor.exited:
            state.ready = True
            log.info("ready", extra={"event": "runtime.ready", "pid": pid})
        _collect_from_now()
        if renewal is not None:
            renewer = asyncio.ensure_future(
                _renewer(renewal, state, inbound, outbound, connections).run()
            )
            renewer.add_done_callback(_renewer_ended)
        waiter = asyncio.ensure_future(supervisor.wait())
        either: list[asyncio.Future[Any]] = [waiter, supervisor.terminating]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        state.ready = False
        for li in inbound:
            li.stop_accepting()
        for lo in outbound:
            lo.stop_accepting()
        for spec in [li.spec for li in inbound] + [lo.spec for lo in outbound]:
            if spec.http is not None:  # HTTP/2 GOAWAY, HTTP/1.1 Connection: close
                spec.http.drain.begin()
        code = await waiter
        dropped = await connections.drain(plan.drain_grace)
        log.info("exiting", extra={"event": "runtime.exit", "code": code, "dropped": dropped})
        return code
    finally:
        state.ready = False
        if renewer is not None:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
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


def _collect_from_now() -> None:
    """Cyclic garbage collection, off while starting (cli.run), from now on; what the
    start made is frozen first: it lives as long as the process, and scanning it on each
    full collection would be work for nothing."""
    import gc

    gc.freeze()
    gc.enable()


def _renewer_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # A bug: without renewal this marble is cut off when its certificate expires.
        log.error("certificate renewal stopped", exc_info=task.exception(),
                  extra={"event": "renewal.internal_error"})  # fmt: skip


class _Serving:
    """Readiness and the bound addresses (``ready.json``), across a cut-off and back."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.ready = False
        self.doc: dict[str, Any] = {"admin": str(plan.config.admin_socket)}

    async def open(self, inbound: Sequence[Inbound], outbound: Sequence[Outbound]) -> None:
        bound = {li.spec.name: _hostport(*await li.start()) for li in inbound}
        sockets = {lo.spec.name: str(await lo.start()) for lo in outbound}
        for name, where in {**bound, **sockets}.items():
            log.info("listening", extra={"event": "listener.start", "listener": name,
                                         "address": where})  # fmt: skip
        self.doc.update({"inbound": bound, "outbound": sockets})


def _renewer(
    renewal: tuple[AgentRenewal, Lease],
    state: _Serving,
    inbound: Sequence[Inbound],
    outbound: Sequence[Outbound],
    connections: ConnectionSet,
) -> Renewer:
    source, lease = renewal
    cfg = state.plan.config

    async def renew() -> Renewed:
        return await asyncio.to_thread(source.renew)

    async def current() -> str | None:
        return await asyncio.to_thread(source.current_intermediate)

    async def apply(renewed: Renewed) -> None:
        assert isinstance(renewed.payload, Renewal)
        set_identity(renewed.payload.identity, cfg, inbound, outbound)
        _set_allow(cfg, renewed.payload.mesh, inbound)
        if cut_off_now.is_set():  # expired before: serve again
            cut_off_now.clear()
            await state.open(inbound, outbound)
            await asyncio.to_thread(_write_ready, cfg.ready_file, state.doc)
            state.ready = True

    cut_off_now = asyncio.Event()

    async def cut_off() -> None:
        cut_off_now.set()
        state.ready = False
        for li in inbound:
            li.stop_accepting()
        for lo in outbound:
            lo.stop_accepting()
        await connections.drain(0)

    return Renewer(lease, renew=renew, current_intermediate=current, apply=apply,
                   cut_off=cut_off, poll=cfg.coordinator.update_poll)  # fmt: skip


def _set_allow(cfg: MarbleConfig, mesh: MeshView, inbound: Sequence[Inbound]) -> None:
    """A manifest update may change Mesh.Allow: new connections follow it. When the
    config's ``allow`` now names callers the manifest no longer allows, only the ones it
    still allows are admitted (narrowed, never widened)."""
    manifest = mesh.callers_of(cfg.marble.type)
    by_name = {i.name: i for i in cfg.inbound}
    for li in inbound:
        c = by_name[li.spec.name]
        if c.clients != "marbles":
            continue
        allowed = manifest if c.allow is None else tuple(t for t in c.allow if t in manifest)
        if allowed != li.spec.allow:
            log.warning("callers changed with the manifest", extra={
                "event": "inbound.allow_changed", "listener": c.name,
                "allow": list(allowed)})  # fmt: skip
            li.spec = dataclasses.replace(li.spec, allow=allowed)


Inbound = InboundListener | NativeInboundListener
Outbound = OutboundListener | NativeOutboundListener


def _listeners(
    plan: RunPlan,
    connections: ConnectionSet,
    metrics: ProxyMetrics | None = None,
    engine: NativeEngine | None = None,
) -> tuple[list[Inbound], list[Outbound]]:
    cfg = plan.config
    if _speaks_http(cfg):
        from meshproxy.proxy._h2native import NativeHttpInboundListener, uses_fast_path
        from meshproxy.proxy.http import HttpLimits, InboundHttp, OutboundHttp, RoutePolicy
    contexts = _Contexts(plan.identity)
    inbound: list[Inbound] = []
    for i in cfg.inbound:
        http = None
        if i.protocol != "tcp":
            our_id = spiffe_id(plan.trust_domain, cfg.marble.type)
            http = InboundHttp(
                i.app_protocol, our_id, plan.routes.get(i.name, RoutePolicy()),
                HttpLimits(idle_timeout=i.timeouts.idle, header_timeout=i.timeouts.header),
                mode=i.protocol, proxy_protocol=i.proxy_protocol == "v2",
            )  # fmt: skip
        spec = InboundSpec(
            name=i.name, host=i.listen.host, port=i.listen.port, clients=i.clients,
            allow=plan.allow.get(i.name, ()), trust_domain=plan.trust_domain,
            app_socket=cfg.inbound_socket(i.name), http=http,
            proxy_protocol=i.proxy_protocol == "v2" and i.protocol == "tcp",
        )  # fmt: skip
        if engine is not None and http is not None and uses_fast_path(http, engine):
            # h2 -> h2c in C (proxy/_h2native); its context selects h2 or http/1.1
            nctx = contexts.native_inbound(i)
            inbound.append(NativeHttpInboundListener(spec, nctx, engine, connections, metrics))
            continue
        if engine is not None and http is None:  # protocol tcp: the C engine relays it
            nctx = contexts.native_inbound(i)
            inbound.append(NativeInboundListener(spec, nctx, engine, connections, metrics))
            continue
        inbound.append(InboundListener(spec, contexts.inbound(i), connections, metrics))
    outbound: list[Outbound] = []
    for o in cfg.outbound:
        spec_out = OutboundSpec(
            name=o.name, socket_path=cfg.outbound_socket(o.name), host=o.upstream.host,
            port=o.upstream.port, sni=o.sni, peer=o.peer, trust_domain=plan.trust_domain,
            http=OutboundHttp(
                contexts.offers(o), mode=o.protocol,
                limits=HttpLimits(idle_timeout=o.timeouts.idle, header_timeout=o.timeouts.header),
            ) if o.protocol != "tcp" else None,
        )  # fmt: skip
        if engine is not None and spec_out.http is None:
            nctx = contexts.native_outbound(o)
            outbound.append(NativeOutboundListener(spec_out, nctx, engine, connections, metrics))
            continue
        outbound.append(OutboundListener(spec_out, contexts.outbound(o), connections, metrics))
    return inbound, outbound


def set_identity(
    identity: TLSIdentity, cfg: MarbleConfig, inbound: Sequence[Inbound],
    outbound: Sequence[Outbound],
) -> None:  # fmt: skip
    """Rotation: every listener's new connections use contexts of ``identity``; open
    connections keep the context (and certificate) they were made with."""
    contexts = _Contexts(identity)
    by_name_in = {i.name: i for i in cfg.inbound}
    by_name_out = {o.name: o for o in cfg.outbound}
    for li in inbound:
        c = by_name_in[li.spec.name]
        if isinstance(li, NativeInboundListener):
            li.set_context(contexts.native_inbound(c))
        else:
            li.set_context(contexts.inbound(c))
    for lo in outbound:
        o = by_name_out[lo.spec.name]
        if isinstance(lo, NativeOutboundListener):
            lo.set_context(contexts.native_outbound(o))
        else:
            lo.set_context(contexts.outbound(o), contexts.offers(o) if lo.spec.http else None)


class _Contexts:
    """The TLS contexts of one identity, one per distinct listener setting (built once)."""

    def __init__(self, identity: TLSIdentity) -> None:
        self._identity = identity
        self._cache: dict[tuple[object, ...], Any] = {}

    def _get(self, key: tuple[object, ...], build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def inbound(self, i: InboundConfig) -> ssl.SSLContext:
        auth, tls, ident = i.clients == "marbles", i.tls, self._identity
        if i.protocol == "tcp":
            return cast(ssl.SSLContext, self._get(("in", auth, tls), lambda: server_context(
                ident, client_auth=auth, min_version=tls.min_version, tickets=tls.session_tickets
            )))  # fmt: skip
        from meshproxy.proxy.http import with_alpn

        # its own context: it selects ALPN h2 (hbone) or h2 / http/1.1
        alpn = ("h2",) if i.protocol == "hbone" else ("h2", "http/1.1")
        return cast(ssl.SSLContext, self._get(("in", auth, tls, alpn), lambda: with_alpn(
            server_context(ident, client_auth=auth, min_version=tls.min_version,
                           tickets=tls.session_tickets), alpn,
        )))  # fmt: skip

    def native_inbound(self, i: InboundConfig) -> Context:
        auth, tls, ident = i.clients == "marbles", i.tls, self._identity
        # protocol http on the engine (the h2 fast path): it selects h2 or http/1.1
        alpn = () if i.protocol == "tcp" else ("h2", "http/1.1")
        return cast("Context", self._get(("nin", auth, tls, alpn), lambda: native_server_context(
            ident, client_auth=auth, min_version=tls.min_version, tickets=tls.session_tickets,
            alpn=alpn,
        )))  # fmt: skip

    def outbound(self, o: OutboundConfig) -> ssl.SSLContext:
        tls, ident = o.tls, self._identity
        return cast(ssl.SSLContext, self._get(("out", tls), lambda: client_context(
            ident, min_version=tls.min_version, tickets=tls.session_tickets
        )))  # fmt: skip

    def native_outbound(self, o: OutboundConfig) -> Context:
        tls, ident = o.tls, self._identity
        return cast("Context", self._get(("nout", tls), lambda: native_client_context(
            ident, min_version=tls.min_version, tickets=tls.session_tickets
        )))  # fmt: skip

    def offers(self, o: OutboundConfig) -> dict[str, ssl.SSLContext]:
        """An HTTP outbound's client contexts, one per ALPN protocol it may offer."""
        tls, ident = o.tls, self._identity
        return {p: cast(ssl.SSLContext, self._get(("offer", p, tls), lambda p=p: client_context(  # type: ignore[misc]
            ident, alpn=(p,), min_version=tls.min_version, tickets=tls.session_tickets
        ))) for p in ("h2", "http/1.1")}  # fmt: skip


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _write_ready(path: Path, doc: Mapping[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    os.replace(tmp, path)
