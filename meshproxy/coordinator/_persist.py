"""The coordinator's persistent state and its (de)serialization to JSON.

Everything the coordinator must remember across restarts is in ``PersistentState``; it is
serialized to JSON, sealed (``_seal``) and stored (``_store``) as one blob after every change.
Two fields are not part of the JSON: ``dek``, the data key that encrypts it, and
``recovery``, the public recovery information kept beside the ciphertext (``_seal``).
Format version 1 (before users, updates and recovery) still loads.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from meshproxy._redact import Secret
from meshproxy.coordinator._recovery import NO_RECOVERY, RecoveryInfo
from meshproxy.coordinator._state import State
from meshproxy.errors import StoreError
from meshproxy.manifest import SecretValue
from meshproxy.pki import Authority, cert_from_pem, cert_to_pem, key_from_pem, key_to_pem

VERSION = 2


@dataclass(frozen=True)
class PendingUpdate:
    """A full manifest update waiting for acknowledgements (MarbleRun's multi-party update)."""

    raw: bytes
    acks: tuple[str, ...]  # user names, the initiator first


def _new_dek() -> Secret:
    return Secret(os.urandom(32))


@dataclass
class PersistentState:
    state: State
    root: Authority
    intermediate: Authority
    root_secret: Secret
    manifest_raw: bytes | None = None
    shared_secrets: dict[str, SecretValue] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)
    # -- since version 2 --
    previous_root_secret: Secret | None = None
    previous_shared: dict[str, SecretValue] = field(default_factory=dict)
    user_secrets: dict[str, SecretValue] = field(default_factory=dict)
    package_svn: dict[str, int] = field(default_factory=dict)  # SecurityVersion updates
    update_log: list[str] = field(default_factory=list)  # JSON lines
    pending: PendingUpdate | None = None
    instances: dict[str, list[str]] = field(default_factory=dict)  # counted type -> UUIDs
    # -- sealed beside the JSON, not in it --
    dek: Secret = field(default_factory=_new_dek)
    recovery: RecoveryInfo = NO_RECOVERY

    def __repr__(self) -> str:
        return f"<PersistentState {self.state.name} activations={self.activations}>"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _authority(a: Authority) -> dict[str, str]:
    return {"cert": cert_to_pem(a.cert).decode(), "key": key_to_pem(a.key).reveal().decode()}


def _secret(v: SecretValue) -> dict[str, Any]:
    return {
        "type": v.type,
        "cert": cert_to_pem(v.cert).decode() if v.cert else None,
        "public": _b64(v.public),
        "private": _b64(v.private.reveal()) if v.private else None,
    }


def dump(s: PersistentState) -> bytes:
    doc: dict[str, Any] = {
        "version": VERSION,
        "state": int(s.state),
        "root": _authority(s.root),
        "intermediate": _authority(s.intermediate),
        "root_secret": _b64(s.root_secret.reveal()),
        "manifest": _b64(s.manifest_raw) if s.manifest_raw is not None else None,
        "shared_secrets": {k: _secret(v) for k, v in s.shared_secrets.items()},
        "activations": s.activations,
        "previous_root_secret": _b64(s.previous_root_secret.reveal())
        if s.previous_root_secret is not None
        else None,
        "previous_shared": {k: _secret(v) for k, v in s.previous_shared.items()},
        "user_secrets": {k: _secret(v) for k, v in s.user_secrets.items()},
        "package_svn": s.package_svn,
        "update_log": s.update_log,
        "pending": {"manifest": _b64(s.pending.raw), "acks": list(s.pending.acks)}
        if s.pending is not None
        else None,
        "instances": s.instances,
    }
    return json.dumps(doc, sort_keys=True).encode()


def load(blob: bytes) -> PersistentState:
    try:
        doc = json.loads(blob)
        if doc.get("version", 1) not in (1, VERSION):
            raise StoreError(
                f"coordinator state has format version {doc.get('version')}; this meshproxy "
                f"reads versions 1 and {VERSION}"
            )
        pending = doc.get("pending")
        prev = doc.get("previous_root_secret")
        return PersistentState(
            state=State(doc["state"]),
            root=_load_authority(doc["root"]),
            intermediate=_load_authority(doc["intermediate"]),
            root_secret=Secret(base64.b64decode(doc["root_secret"])),
            manifest_raw=base64.b64decode(doc["manifest"]) if doc["manifest"] else None,
            shared_secrets={k: _load_secret(v) for k, v in doc["shared_secrets"].items()},
            activations={str(k): int(v) for k, v in doc["activations"].items()},
            previous_root_secret=Secret(base64.b64decode(prev)) if prev else None,
            previous_shared={k: _load_secret(v) for k, v in doc.get("previous_shared", {}).items()},
            user_secrets={k: _load_secret(v) for k, v in doc.get("user_secrets", {}).items()},
            package_svn={str(k): int(v) for k, v in doc.get("package_svn", {}).items()},
            update_log=[str(line) for line in doc.get("update_log", [])],
            pending=PendingUpdate(
                base64.b64decode(pending["manifest"]), tuple(str(a) for a in pending["acks"])
            )
            if pending
            else None,
            instances={str(k): [str(u) for u in v] for k, v in doc.get("instances", {}).items()},
        )
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise StoreError(f"coordinator state does not parse: {type(exc).__name__}") from None


def _load_authority(d: dict[str, str]) -> Authority:
    key = key_from_pem(Secret(d["key"].encode()))
    return Authority(cert_from_pem(d["cert"].encode()), key)


def _load_secret(d: dict[str, Any]) -> SecretValue:
    return SecretValue(
        type=d["type"],
        cert=x509.load_pem_x509_certificate(d["cert"].encode()) if d["cert"] else None,
        public=base64.b64decode(d["public"]),
        private=Secret(base64.b64decode(d["private"])) if d["private"] else None,
    )
