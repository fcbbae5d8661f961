"""Composition root of ``meshproxy coordinator``: builds the pieces, serves until SIGTERM.

Startup: quote provider (``--attestation``: the simulated platform, or Gramine's or Occlum's
device inside an enclave) -> store (file or etcd) + vault -> load (or create, or join via a
peer, or enter recovery) -> core -> two HTTPS listeners. Simulation is announced at every
start. A replica on etcd registers its mesh address for peers, and
while it is locked out of the shared state it keeps asking them for the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from meshproxy._log import setup as setup_logging
from meshproxy.attestation import (
    INTEL_QE_VENDOR_ID,
    SIM_VENDOR_ID,
    EnclaveDescription,
    EnclaveIdentity,
    QuoteProvider,
    SimulationPlatform,
    SimulationProvider,
    TrustAnchor,
    default_platform_dir,
    intel_anchor,
    measure,
    parse_quote,
    provider_for,
    simulation_anchor,
)
from meshproxy.coordinator import _replica
from meshproxy.coordinator._api import Api
from meshproxy.coordinator._auth import Owner
from meshproxy.coordinator._boot import StateSync, load_or_create, register
from meshproxy.coordinator._core import CoordinatorCore
from meshproxy.coordinator._etcd import EtcdStore, EtcdTLS
from meshproxy.coordinator._sealers import sealing_keys_for
from meshproxy.coordinator._state import State, require
from meshproxy.coordinator._store import FileStore, VersionedStore
from meshproxy.coordinator._tls import SwitchingContext
from meshproxy.coordinator._vault import Vault
from meshproxy.errors import AttestationError, ConfigError, MeshError, StoreError
from meshproxy.pki import cert_from_pem, cert_to_pem

log = logging.getLogger("meshproxy.coordinator")
COORDINATOR_PRODUCT_ID = 1
COORDINATOR_SECURITY_VERSION = 1
KEY_RETRY_SECONDS = 2.0
# Connections the kernel queues before the loop accepts them. Many marbles starting at once
# (a deployment scaled up) overflow aiohttp's default of 128: the kernel then drops their
# SYNs and each retries after its 1 s retransmission timeout (seen in the bench as a 1.2 s
# p99). The kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class Options:
    state_dir: Path
    client_addr: tuple[str, int]
    mesh_addr: tuple[str, int]
    dns_names: tuple[str, ...]
    simulation: bool
    platform_dir: Path | None
    log_level: str = "info"
    log_format: str = "json"
    store: str = "file"  # file | etcd
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/meshproxy/"
    etcd_ca: Path | None = None  # TLS to etcd (https:// endpoints)
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    owner_cert: Path | None = None
    owner_token_file: Path | None = None
    trust_platforms: tuple[Path, ...] = ()  # more simulated machines whose quotes count
    advertise: str | None = None  # mesh address peers use; default: the bound one
    seal: str = "simulation"  # simulation | gramine | none (``_sealers``)
    device_dir: Path | None = None  # stands in for /dev (Gramine's attestation/, Occlum's sgx)
    attestation: str | None = None  # simulation | gramine | occlum; None: per ``simulation``


NO_PROVIDER = (
    "no quote provider chosen: inside an SGX enclave pass --attestation gramine or "
    "--attestation occlum; to run without SGX (simulated quotes) pass --simulation"
)
# The report data of the quote a hardware coordinator makes at start to learn its identity.
IDENTITY_PROBE = hashlib.sha256(b"meshproxy coordinator identity probe v1").digest()


def coordinator_identity() -> EnclaveIdentity:
    """The coordinator's simulated enclave identity: a measurement of meshproxy itself."""
    desc = EnclaveDescription(
        path=Path("<meshproxy coordinator>"),
        name="meshproxy-coordinator",
        product_id=COORDINATOR_PRODUCT_ID,
        security_version=COORDINATOR_SECURITY_VERSION,
        debug=False,
        files=("meshproxy",),
    )
    unique_id, _ = measure(desc)
    return EnclaveIdentity(
        unique_id=unique_id,
        signer_id=hashlib.sha256(b"meshproxy simulation signer").digest(),
        product_id=COORDINATOR_PRODUCT_ID,
        security_version=COORDINATOR_SECURITY_VERSION,
        debug=False,
    )


@dataclass(frozen=True)
class Attester:
    """How this coordinator quotes (``provider``), who it is (``identity``: peer replicas
    must match it) and whose quotes it trusts (``anchors``)."""

    kind: str  # simulation | gramine | occlum
    provider: QuoteProvider
    identity: EnclaveIdentity
    anchors: tuple[TrustAnchor, ...]
    platform: SimulationPlatform | None  # only in simulation


def attestation_kind(options: Options) -> str:
    """``--attestation``, or simulation for ``--simulation``; the two must agree."""
    kind = options.attestation or ("simulation" if options.simulation else None)
    if kind is None:
        raise ConfigError(NO_PROVIDER)
    if (kind == "simulation") != options.simulation:
        raise ConfigError(
            "--attestation simulation and --simulation go together"
            if kind == "simulation"
            else f"--simulation contradicts --attestation {kind}: give one of them"
        )
    return kind


def own_identity(provider: QuoteProvider, kind: str) -> EnclaveIdentity:
    """This enclave's identity, from a quote of its own (one at start; it also proves the
    device works before anything is served)."""
    try:
        quote = parse_quote(provider.get_quote(IDENTITY_PROBE))
    except AttestationError as exc:
        raise ConfigError(f"--attestation {kind}: {exc}") from None
    if quote.vendor_id != INTEL_QE_VENDOR_ID:
        raise ConfigError(
            f"--attestation {kind}: the device's quote is not from Intel's quoting enclave "
            f"(vendor ID {quote.vendor_id.hex()})"
        )
    return EnclaveIdentity.from_body(quote.body)


def attester_for(
    options: Options, now: datetime, *, device: QuoteProvider | None = None
) -> Attester:
    """``device``: a hardware provider to use instead of the one ``options`` name (tests)."""
    kind = attestation_kind(options)
    if kind != "simulation":
        provider = device or provider_for(kind, device_root=options.device_dir)
        identity = own_identity(provider, kind)
        return Attester(kind, provider, identity, (intel_anchor(),), None)
    platform = SimulationPlatform.load_or_create(
        options.platform_dir or default_platform_dir(), now=now
    )
    identity = coordinator_identity()
    anchors = [intel_anchor(), simulation_anchor(platform)]
    anchors += [_platform_anchor(d) for d in options.trust_platforms]
    provider = SimulationProvider(platform, identity)
    return Attester(kind, provider, identity, tuple(anchors), platform)


def _platform_anchor(directory: Path) -> TrustAnchor:
    """The simulation root of another simulated machine (only its root.pem is read)."""
    path = directory / "root.pem"
    try:
        cert = cert_from_pem(path.read_bytes(), str(path))
    except OSError as exc:
        raise ConfigError(f"--trust-sim-platform {directory}: {exc.strerror}") from None
    return TrustAnchor("simulation", cert, True, SIM_VENDOR_ID)


def _owner(options: Options) -> Owner | None:
    cert_der = token = None
    if options.owner_cert is not None:
        try:
            cert = cert_from_pem(options.owner_cert.read_bytes(), str(options.owner_cert))
        except OSError as exc:
            raise ConfigError(f"--owner-cert {options.owner_cert}: {exc.strerror}") from None
        cert_der = cert.public_bytes(Encoding.DER)
    if options.owner_token_file is not None:
        try:
            text = options.owner_token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--owner-token-file {options.owner_token_file}: {exc}") from None
        if len(text) < 16:
            raise ConfigError(
                f"--owner-token-file {options.owner_token_file}: the token is shorter than 16 "
                "characters; use a long random one (e.g. openssl rand -hex 32)"
            )
        token = Owner.token_digest(text)
    if cert_der is None and token is None:
        return None
    return Owner(cert_der=cert_der, token_sha256=token)


@dataclass
class Built:
    core: CoordinatorCore
    store: VersionedStore
    sync: StateSync
    key_server: _replica.KeyServer | None
    fetch_key: Callable[[], bool] | None  # replicas: get the state key from a peer


def build_core(options: Options, now: datetime) -> tuple[CoordinatorCore, VersionedStore]:
    built = build(options, now)
    return built.core, built.store


def build(options: Options, now: datetime, *, device: QuoteProvider | None = None) -> Built:
    attester = attester_for(options, now, device=device)
    provider, identity, anchors = attester.provider, attester.identity, attester.anchors
    if attester.platform is None:
        log.info(
            "hardware attestation: quotes come from the enclave's device",
            extra={
                "attestation": attester.kind,
                "unique_id": identity.unique_id.hex(),
                "signer_id": identity.signer_id.hex(),
            },
        )
    owner = _owner(options)
    store: VersionedStore
    if options.store == "etcd":
        options.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tls = EtcdTLS(options.etcd_ca, options.etcd_cert, options.etcd_key)
        store = EtcdStore(options.etcd_endpoints, options.etcd_prefix, tls=tls)
    else:
        store = FileStore(options.state_dir)
    keys = sealing_keys_for(
        options.seal, platform=attester.platform, identity=identity, device_dir=options.device_dir
    )
    vault = Vault(keys, store.where)
    sync = StateSync(store, vault)

    def fetch_key() -> bool:
        if not isinstance(store, EtcdStore):
            return False
        # Our own registration may be among them: we answer "not shared" and move on.
        peers = list(store.members().values())
        got = _replica.fetch_from_any(
            peers,
            provider=provider,
            anchors=anchors,
            identity=identity,
            simulation=options.simulation,
        )
        if got is None:
            return False
        vault.adopt_key(got[0])
        log.info("received the state key from a peer replica", extra={"peer": got[1]})
        return True

    sync.key_source = fetch_key if isinstance(store, EtcdStore) else None
    loaded = load_or_create(
        sync,
        lambda: CoordinatorCore.fresh_state(
            now=now, dns_names=options.dns_names, simulation=options.simulation
        ),
    )
    core = CoordinatorCore(
        loaded.persistent,
        commit=sync.commit,
        provider=provider,
        anchors=anchors,
        simulation=options.simulation,
        refresh=sync.refresh if store.shared else None,
        locked=sync if loaded.locked else None,
        owner=owner,
        # Replicas accept each other's nonces, each once across all of them.
        used_nonces=store if isinstance(store, EtcdStore) else None,
    )
    key_server = None
    if isinstance(store, EtcdStore):
        key_server = _replica.KeyServer(
            vault.export_key,
            provider=provider,
            anchors=anchors,
            identity=identity,
            simulation=options.simulation,
            can_share=lambda: require(core.state, "share_state_key"),
        )
    if owner is None and core.state in (State.ACCEPTING_MANIFEST, State.RECOVERY):
        log.warning(
            "no --owner-cert or --owner-token-file: the first client to set a manifest owns "
            "this coordinator; clients must verify the manifest (meshproxy manifest verify)"
        )
    return Built(core, store, sync, key_server, fetch_key if key_server else None)


async def _unlock_loop(api: Api, built: Built) -> None:
    """A replica locked out of the shared state keeps asking peers for the key."""
    fetch = built.fetch_key
    if fetch is None:
        return
    while built.core.state is State.RECOVERY:
        await asyncio.sleep(KEY_RETRY_SECONDS)

        def attempt() -> None:
            if built.core.state is not State.RECOVERY or not fetch():
                return
            state = built.sync.load()
            if state is not None:
                if built.sync.vault.needs_registration():
                    register(built.sync, state)
                built.core.unlock(state)

        try:
            await api.call(attempt)
        except MeshError as exc:
            log.warning("still locked out of the shared state", extra={"reason": str(exc)})


async def serve(options: Options) -> None:
    now = datetime.now(UTC)
    built = await asyncio.to_thread(build, options, now)
    core, store = built.core, built.store
    if options.simulation:
        log.warning(
            "SIMULATION MODE: no hardware isolation; this coordinator's quotes are simulated "
            "and only clients started with --accept-simulation will trust it"
        )
    api = Api(core)
    api.key_server = built.key_server
    client_ctx = SwitchingContext(lambda: core.root, lambda: _trusted_client_certs(core))
    mesh_ctx = SwitchingContext(lambda: core.root)
    runners = []
    bound: dict[str, str] = {}
    member_id = uuid.uuid4().hex
    unlock: asyncio.Task[None] | None = None
    try:
        for name, app, (host, port), ctx in (
            ("client", api.client_app(), options.client_addr, client_ctx),
            ("mesh", api.mesh_app(), options.mesh_addr, mesh_ctx),
        ):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(
                runner,
                host or None,
                port,
                ssl_context=ctx.base,
                reuse_address=True,
                backlog=LISTEN_BACKLOG,
            )
            await site.start()
            runners.append(runner)
            for addr in runner.addresses:
                bound[name] = f"{addr[0]}:{addr[1]}"
        if isinstance(store, EtcdStore):
            advertise = options.advertise or bound["mesh"]
            await api.call(lambda: store.register_member(member_id, advertise))
            unlock = asyncio.create_task(_unlock_loop(api, built))
        _write_endpoints(options.state_dir, bound)
        # What start-up made (modules, the state, the TLS contexts) lives as long as the
        # process: keep it out of the collector, or every full collection walks all of it
        # (tens of ms with the event loop stopped: a latency spike for every marble then).
        gc.freeze()
        code, _ = core.status()
        log.info("coordinator ready", extra={**bound, "state": State(code).name})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("coordinator stopping")
    finally:
        if unlock is not None:
            unlock.cancel()
        if isinstance(store, EtcdStore):
            with contextlib.suppress(StoreError):
                await api.call(lambda: store.unregister_member(member_id))
        for runner in runners:
            await runner.cleanup()
        api.close()
        store.close()


def _trusted_client_certs(core: CoordinatorCore) -> list[bytes]:
    """Client certificates the client API's TLS accepts: users, and the owner at first."""
    out = []
    manifest = core.manifest
    if manifest is not None and core.state is State.ACCEPTING_MARBLES:
        out += [u.certificate_pem for u in manifest.users.values()]
    owner = core.owner
    if owner is not None and owner.cert_der and core.state is not State.ACCEPTING_MARBLES:
        out.append(cert_to_pem(x509.load_der_x509_certificate(owner.cert_der)))
    return out


def _write_endpoints(state_dir: Path, bound: dict[str, str]) -> None:
    """Where the listeners actually are (port 0 picks one), for scripts and tests."""
    doc = {**bound, "pid": os.getpid()}
    tmp = state_dir / ".endpoints.json.tmp"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, state_dir / "endpoints.json")


def run(options: Options) -> int:
    setup_logging(options.log_level, options.log_format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop is a dependency; without it asyncio's loop still works
        pass
    asyncio.run(serve(options))
    return 0
