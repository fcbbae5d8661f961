"""The coordinator's persistent state and its (de)serialization to JSON.

Everything the coordinator must remember across restarts is in ``PersistentState``; it is
serialized to JSON, sealed (``_seal``) and stored (``_store``) as one blob after every change.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from meshproxy._redact import Secret
from meshproxy.coordinator._state import State
from meshproxy.errors import StoreError
from meshproxy.manifest import SecretValue
from meshproxy.pki import Authority, cert_from_pem, cert_to_pem, key_from_pem, key_to_pem


@dataclass
class PersistentState:
    state: State
    root: Authority
    intermediate: Authority
    root_secret: Secret
    manifest_raw: bytes | None = None
    shared_secrets: dict[str, SecretValue] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)

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
    doc = {
        "version": 1,
        "state": int(s.state),
        "root": _authority(s.root),
        "intermediate": _authority(s.intermediate),
        "root_secret": _b64(s.root_secret.reveal()),
        "manifest": _b64(s.manifest_raw) if s.manifest_raw is not None else None,
        "shared_secrets": {k: _secret(v) for k, v in s.shared_secrets.items()},
        "activations": s.activations,
    }
    return json.dumps(doc, sort_keys=True).encode()


def load(blob: bytes) -> PersistentState:
    try:
        doc = json.loads(blob)
        return PersistentState(
            state=State(doc["state"]),
            root=_load_authority(doc["root"]),
            intermediate=_load_authority(doc["intermediate"]),
            root_secret=Secret(base64.b64decode(doc["root_secret"])),
            manifest_raw=base64.b64decode(doc["manifest"]) if doc["manifest"] else None,
            shared_secrets={k: _load_secret(v) for k, v in doc["shared_secrets"].items()},
            activations={str(k): int(v) for k, v in doc["activations"].items()},
        )
    except (KeyError, ValueError, TypeError) as exc:
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
