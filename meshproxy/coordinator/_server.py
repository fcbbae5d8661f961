"""Composition root of ``meshproxy coordinator``: builds the pieces, serves until SIGTERM.

Startup: simulated platform and quote provider -> store + sealer -> load (or create, or
enter recovery) -> core -> two HTTPS listeners. Simulation is announced at every start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from meshproxy._log import setup as setup_logging
from meshproxy._redact import Secret
from meshproxy.attestation import (
    EnclaveDescription,
    EnclaveIdentity,
    SimulationPlatform,
    SimulationProvider,
    default_platform_dir,
    intel_anchor,
    measure,
    simulation_anchor,
)
from meshproxy.coordinator import _persist, _seal
from meshproxy.coordinator._api import Api
from meshproxy.coordinator._core import CoordinatorCore
from meshproxy.coordinator._state import Event, State, advance
from meshproxy.coordinator._store import FileStore
from meshproxy.coordinator._tls import server_context
from meshproxy.errors import MeshError

log = logging.getLogger("meshproxy.coordinator")
COORDINATOR_PRODUCT_ID = 1
COORDINATOR_SECURITY_VERSION = 1


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


class _PlatformSealer:
    def __init__(self, platform: SimulationPlatform) -> None:
        self.name = "simulation"
        self._platform = platform

    def key(self) -> Secret:
        return self._platform.sealing_key(b"meshproxy coordinator state sealing v1")


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
    import hashlib

    return EnclaveIdentity(
        unique_id=unique_id,
        signer_id=hashlib.sha256(b"meshproxy simulation signer").digest(),
        product_id=COORDINATOR_PRODUCT_ID,
        security_version=COORDINATOR_SECURITY_VERSION,
        debug=False,
    )


def build_core(options: Options, now: datetime) -> tuple[CoordinatorCore, FileStore]:
    if not options.simulation:
        raise MeshError(
            "no SGX quote provider is available on this machine (no /dev/attestation, no "
            "/dev/sgx): start the coordinator with --simulation to run without hardware"
        )
    platform = SimulationPlatform.load_or_create(
        options.platform_dir or default_platform_dir(), now=now
    )
    provider = SimulationProvider(platform, coordinator_identity())
    anchors = [intel_anchor(), simulation_anchor(platform)]
    store = FileStore(options.state_dir)
    sealer = _PlatformSealer(platform)

    def commit(s: _persist.PersistentState) -> None:
        store.save(_seal.seal(_persist.dump(s), sealer))

    blob = store.load()
    if blob is None:
        persistent = CoordinatorCore.fresh_state(
            now=now, dns_names=options.dns_names, simulation=options.simulation
        )
        commit(persistent)
        log.info("created a new root CA", extra={"state_dir": str(options.state_dir)})
    else:
        try:
            persistent = _persist.load(_seal.unseal(blob, sealer, str(store.path)))
            persistent.state = (
                advance(State.UNINITIALIZED, Event.LOADED)
                if (persistent.manifest_raw is not None)
                else State.ACCEPTING_MANIFEST
            )
            log.info("loaded sealed state", extra={"state": persistent.state.name})
        except _seal.UnsealError as exc:
            # Keep the sealed blob untouched; a new root lives in memory until a manifest
            # is set (which replaces the old state) or a later recovery restores it.
            log.error("cannot unseal state; entering recovery mode", extra={"reason": str(exc)})
            persistent = CoordinatorCore.fresh_state(
                now=now, dns_names=options.dns_names, simulation=options.simulation
            )
            persistent.state = advance(State.UNINITIALIZED, Event.UNSEAL_FAILED)
    core = CoordinatorCore(
        persistent,
        commit=commit,
        provider=provider,
        anchors=anchors,
        simulation=options.simulation,
    )
    return core, store


async def serve(options: Options) -> None:
    now = datetime.now(UTC)
    core, store = await asyncio.to_thread(build_core, options, now)
    if options.simulation:
        log.warning(
            "SIMULATION MODE: no hardware isolation; this coordinator's quotes are simulated "
            "and only clients started with --accept-simulation will trust it"
        )
    api = Api(core)
    ctx = server_context(core.root)
    runners = []
    bound: dict[str, str] = {}
    try:
        for name, app, (host, port) in (
            ("client", api.client_app(), options.client_addr),
            ("mesh", api.mesh_app(), options.mesh_addr),
        ):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, host or None, port, ssl_context=ctx, reuse_address=True)
            await site.start()
            runners.append(runner)
            for addr in runner.addresses:
                bound[name] = f"{addr[0]}:{addr[1]}"
        _write_endpoints(options.state_dir, bound)
        code, _ = core.status()
        log.info("coordinator ready", extra={**bound, "state": State(code).name})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("coordinator stopping")
    finally:
        for runner in runners:
            await runner.cleanup()
        api.close()
        store.close()


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
