"""What ``meshproxy run`` serves with, as its attestation agent (``_agent``) answered it:
an activation and a renewal without cryptography objects, and how the proxy renews.

Its own module: ``meshproxy run`` imports ``_agent`` before forking the agent, which
needs none of this; the proxy loads it after the fork.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshproxy import errors
from meshproxy._redact import Secret
from meshproxy.errors import ConnectError

if TYPE_CHECKING:
    from meshproxy.manifest import RouteRule
    from meshproxy.runtime._lease import Lease
    from meshproxy.runtime._renew import Renewed
    from meshproxy.tls import TLSIdentity


@dataclass(frozen=True)
class MeshView:
    """The manifest's mesh policy as the data plane needs it (``MeshPolicy``'s interface)."""

    trust_domain: str
    allow: Mapping[str, tuple[str, ...]]
    routes: Mapping[str, tuple[Mapping[str, Any], ...]] = field(default_factory=dict)

    def callers_of(self, marble_type: str) -> tuple[str, ...]:
        return self.allow.get(marble_type, ())

    def routes_of(self, marble_type: str) -> tuple[RouteRule, ...]:
        from meshproxy.manifest import RouteRule  # only HTTP listeners have routes

        return tuple(
            RouteRule(
                path=r["path"],
                path_prefix=r["path_prefix"],
                methods=tuple(r["methods"]),
                allow=tuple(r["allow"]),
            )
            for r in self.routes.get(marble_type, ())
        )


@dataclass(frozen=True)
class Activated:
    """An activation, without cryptography objects: what ``meshproxy run`` serves with."""

    uuid: str
    identity: TLSIdentity
    root_pem: bytes
    files: Mapping[str, bytes] = field(repr=False)
    env: Mapping[str, bytes] = field(repr=False)
    argv: tuple[str, ...]
    mesh: MeshView
    lease: Lease
    simulated: bool
    sealing_key: Secret | None = field(default=None, repr=False)  # Gramine's mounts


@dataclass(frozen=True)
class Renewal:
    """A renewed identity: what the renewer installs."""

    identity: TLSIdentity
    mesh: MeshView


@dataclass(frozen=True)
class AgentRenewal:
    """How the running proxy renews (through the agent) and learns of updates."""

    config: Path
    uuid: str
    root_pem: bytes
    host: str  # the coordinator's mesh API
    port: int
    timeout: float = 10.0

    def renew(self) -> Renewed:
        from meshproxy.runtime._agent import renew
        from meshproxy.runtime._renew import Renewed

        lease, renewal = renew(self.config, self.uuid, self.root_pem, self.timeout)
        return Renewed(lease, renewal)

    def current_intermediate(self) -> str | None:
        """The SHA-256 fingerprint of the cluster's current intermediate, from the mesh
        API's ``GET /api/v2/status``; None from a coordinator that does not say.

        Blocking (a thread). HTTPS pinned to the root as ``client.Connection`` does, with
        the stdlib only: the proxy does not load the coordinator client for a poll."""
        import http.client
        import ssl

        from meshproxy.coordinator import _wire as wire

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the identity is the pinned root itself, checked below
        ctx.load_verify_locations(cadata=self.root_pem.decode())
        where = f"coordinator {self.host}:{self.port}"
        conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                           context=ctx)  # fmt: skip
        try:
            conn.connect()
            presented = conn.sock.getpeercert(binary_form=True) if conn.sock else None
            if presented != ssl.PEM_cert_to_DER_cert(self.root_pem.decode()):
                raise errors.PKIError(f"{where} does not present the pinned root certificate")
            conn.request("GET", wire.MESH_PATHS["status"])
            raw = conn.getresponse().read()
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectError(f"cannot reach {where}: {exc}") from None
        finally:
            conn.close()
        try:
            doc = json.loads(raw)
            value = doc["data"].get("intermediate") if doc.get("status") == "success" else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
            raise ConnectError(f"{where} answered a status that is not JSend") from None
        if value is not None and not isinstance(value, str):
            raise ConnectError(f"{where}: status.intermediate is not text")
        return value
