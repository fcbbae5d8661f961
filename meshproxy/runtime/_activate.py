"""Everything before the event loop: measurement, quote provider, instance UUID,
activation with retries, and writing the manifest's Files.

All of it blocks (files, key generation, HTTPS to the coordinator) and so runs before the
loop starts. Time and sleep are parameters of the retry loop so it can be tested without
a clock.
"""

from __future__ import annotations

import logging
import os
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from meshproxy.config import MarbleConfig
from meshproxy.errors import AttestationError, ConfigError, ConnectError, CoordinatorError
from meshproxy.pki import cert_from_pem

if TYPE_CHECKING:
    from meshproxy.attestation import QuoteProvider
    from meshproxy.coordinator.client import Activation

log = logging.getLogger("meshproxy.runtime")

FIRST_BACKOFF = 0.2
MAX_BACKOFF = 5.0
ATTEMPT_TIMEOUT = 10.0


def quote_provider(cfg: MarbleConfig) -> QuoteProvider:
    """The configured provider. Simulation re-measures the enclave first and refuses to
    run on a mismatch; under Gramine or Occlum the hardware measured it at launch."""
    from meshproxy.attestation import (
        SimulationPlatform,
        SimulationProvider,
        check_measurement,
        default_platform_dir,
        load_signed,
    )

    att = cfg.attestation
    if att.provider != "simulation":
        from meshproxy.attestation import provider_for

        provider = provider_for(att.provider, device_root=att.device_dir)
        log.info(
            "hardware quote provider",
            extra={"event": "attestation.provider", "provider": att.provider,
                   "device_dir": str(att.device_dir)},
        )  # fmt: skip
        return provider
    assert att.enclave is not None  # the config requires it for simulation
    log.warning(
        "SIMULATION MODE: quotes come from a simulated platform; there is NO hardware "
        "isolation and the host can read this process's memory",
        extra={"event": "attestation.simulation"},
    )
    signed = load_signed(att.enclave)
    try:
        identity = check_measurement(signed, att.enclave.parent)
    except AttestationError as exc:
        raise AttestationError(
            f"{att.enclave}: {exc}; refusing to run code that is not what was signed",
            check=exc.check,
        ) from None
    log.info(
        "enclave measured",
        extra={"event": "attestation.measured", "enclave": signed.name,
               "unique_id": signed.unique_id.hex(), "signer_id": signed.signer_id.hex()},
    )  # fmt: skip
    platform_dir = att.platform_dir or default_platform_dir()
    platform = SimulationPlatform.load_or_create(platform_dir, now=datetime.now(UTC))
    return SimulationProvider(platform, identity)


def instance_uuid(path: Path | None) -> uuidlib.UUID:
    """The instance UUID kept in ``path`` (created 0600 on first start), else a fresh one."""
    if path is None:
        return uuidlib.uuid4()
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        value = uuidlib.uuid4()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{value}\n")
        log.info("new instance uuid", extra={"event": "marble.uuid", "uuid": str(value)})
        return value
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the instance UUID: {exc}") from None
    try:
        return uuidlib.UUID(text)
    except ValueError:
        raise ConfigError(f"{path}: does not hold a UUID (delete it to get a new one)") from None


Attempt = Callable[[float], "Activation"]


def activate_with_retry(
    address: str,
    attempt: Attempt,
    *,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Activation:
    """Call ``attempt(per_attempt_timeout)`` until it succeeds or ``timeout`` is spent.

    Unreachable (ConnectError) and refused (CoordinatorError: 503 not ready, 4xx with the
    coordinator's reason) are retried with backoff 0.2 s doubling to 5 s. Trust failures
    (a wrong pinned root, a coordinator quote that does not verify) are not: retrying
    cannot make an untrusted coordinator trustworthy.
    """
    start = clock()
    delay = FIRST_BACKOFF
    attempts = 0
    while True:
        attempts += 1
        remaining = timeout - (clock() - start)
        try:
            return attempt(max(1.0, min(ATTEMPT_TIMEOUT, remaining)))
        except (ConnectError, CoordinatorError) as exc:
            last: ConnectError | CoordinatorError = exc
        elapsed = clock() - start
        if elapsed + delay > timeout:
            message = (
                f"could not activate with coordinator {address} after {attempts} attempts "
                f"in {elapsed:.0f}s: {last}"
            )
            if isinstance(last, CoordinatorError):
                raise CoordinatorError(message, http_status=last.http_status) from None
            raise ConnectError(message) from None
        status = getattr(last, "http_status", None)
        log.warning(
            "activation failed; retrying",
            extra={"event": "activation.retry", "attempt": attempts, "reason": str(last),
                   "http_status": status, "retry_in_s": delay},
        )  # fmt: skip
        sleep(delay)
        delay = min(delay * 2, MAX_BACKOFF)


def activate(
    cfg: MarbleConfig, key: ec.EllipticCurvePrivateKey, provider: QuoteProvider
) -> Activation:
    """Activate this marble with the coordinator named in the config (with retries)."""
    from meshproxy.coordinator.client import activate as activate_once

    root = None
    if cfg.coordinator.root_cert is not None:
        try:
            root = cert_from_pem(cfg.coordinator.root_cert.read_bytes(), "coordinator.root_cert")
        except OSError as exc:
            raise ConfigError(f"coordinator.root_cert {cfg.coordinator.root_cert}: {exc}") from None
    policy = None
    if cfg.coordinator.policy is not None:
        from meshproxy.attestation import load_coordinator_policy

        policy = load_coordinator_policy(cfg.coordinator.policy)
    instance = instance_uuid(cfg.marble.uuid_file)
    address = str(cfg.coordinator.address)
    if root is None and policy is None:
        log.warning(
            "the coordinator's identity is not pinned: set coordinator.policy (or root_cert); "
            "any coordinator enclave on a trusted platform is accepted",
            extra={"event": "activation.unpinned", "coordinator": address},
        )
    log.info(
        "activating",
        extra={"event": "activation.start", "coordinator": address, "uuid": str(instance),
               "marble_type": cfg.marble.type, "pinned_root": root is not None,
               "policy": str(cfg.coordinator.policy) if policy is not None else None},
    )  # fmt: skip

    def attempt(per_attempt: float) -> Activation:
        return activate_once(
            address,
            marble_type=cfg.marble.type,
            instance=instance,
            key=key,
            dns_names=cfg.marble.dns_names,
            provider=provider,
            root=root,
            accept_simulation=cfg.attestation.accept_simulation,
            platform_dir=cfg.attestation.platform_dir,
            timeout=per_attempt,
            policy=policy,
        )

    activation = activate_with_retry(address, attempt, timeout=cfg.coordinator.activation_timeout)
    install_sealing_key(provider, activation)
    log.info(
        "activated",
        extra={"event": "activation.done", "uuid": activation.uuid,
               "simulated": activation.simulated, "files": len(activation.files),
               "env_names": len(activation.env)},
    )  # fmt: skip
    return activation


def install_sealing_key(provider: QuoteProvider, activation: Activation) -> None:
    """Under Gramine, give the encrypted mounts of ``enclave gramine-manifest`` (key name
    ``SEAL_KEY_NAME``) the marble's virtual sealing key, before the app can open them.
    Other providers have no such interface: the key is not used there."""
    if provider.name != "gramine":  # decided before loading the providers and templates
        return
    from meshproxy.attestation import SEAL_KEY_NAME, GramineProvider

    if not isinstance(provider, GramineProvider):
        return
    if activation.sealing_key is None:
        raise CoordinatorError(
            "the coordinator sent no sealing key for this marble's Gramine encrypted mounts; "
            "upgrade the coordinator"
        )
    path = provider.install_key(SEAL_KEY_NAME, activation.sealing_key)
    log.info("sealing key installed", extra={"event": "attestation.sealing_key",
                                             "path": str(path)})  # fmt: skip


def write_files(files_root: Path, files: Mapping[str, bytes]) -> list[Path]:
    """Write the manifest's Files under ``files_root`` (files 0600, directories 0700).

    A manifest path ``/etc/x`` lands at ``<files_root>/etc/x``. Paths with ``..`` are
    refused, and no existing symlink is followed, so nothing lands outside the root.
    """
    files_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        rel = PurePosixPath(name.lstrip("/"))
        if not rel.parts or any(p in ("..", ".") for p in rel.parts) or "\0" in name:
            raise ConfigError(f"manifest file path {name!r} escapes the files root; refusing")
        target = files_root.joinpath(*rel.parts)
        parent = files_root
        for part in rel.parts[:-1]:
            parent = parent / part
            if parent.is_symlink():
                raise ConfigError(f"manifest file path {name!r}: {parent} is a symlink")
            parent.mkdir(mode=0o700, exist_ok=True)
        tmp = target.with_name(f".{target.name}.meshproxy-tmp")
        tmp.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
        written.append(target)
    log.info("files written", extra={"event": "files.written", "count": len(written),
                                     "files_root": str(files_root)})  # fmt: skip
    return written
