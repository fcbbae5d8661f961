"""aiohttp adapter: HTTP requests in, core calls on the core's worker thread, JSend out.

Two applications share one core: the client API (operators and users; default :4433) and
the mesh API (marbles; default :2001). Both present the root certificate, which is what a
client pins after verifying the coordinator's quote.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator._core import ActivationRequest, CoordinatorCore
from meshproxy.errors import (
    AttestationError,
    ManifestError,
    MeshError,
    PolicyError,
    StateError,
    StoreError,
)
from meshproxy.pki import cert_to_pem

log = logging.getLogger("meshproxy.coordinator.api")
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 1 << 20


class Api:
    def __init__(self, core: CoordinatorCore) -> None:
        self.core = core
        # One worker thread is the core's mutex and keeps crypto off the event loop.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="core")

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # -- applications ----------------------------------------------------------------------
    def client_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_jsend_errors])
        app.router.add_get(wire.CLIENT_PATHS["quote"], self.quote)
        app.router.add_get(wire.CLIENT_PATHS["manifest"], self.get_manifest)
        app.router.add_post(wire.CLIENT_PATHS["manifest"], self.set_manifest)
        app.router.add_get(wire.CLIENT_PATHS["status"], self.status)
        return app

    def mesh_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_jsend_errors])
        app.router.add_get(wire.MESH_PATHS["quote"], self.quote)
        app.router.add_get(wire.MESH_PATHS["status"], self.status)
        app.router.add_post(wire.MESH_PATHS["nonce"], self.nonce)
        app.router.add_post(wire.MESH_PATHS["activate"], self.activate)
        return app

    # -- handlers ----------------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        code, message = self.core.status()
        return _ok({"code": code, "message": message, "simulation": self.core.simulation})

    async def quote(self, request: web.Request) -> web.Response:
        nonce_text = request.query.get("nonce", "")
        try:
            nonce = _b64url(nonce_text) if nonce_text else b""
        except ValueError:
            raise PolicyError("query parameter nonce is not base64url") from None
        quote = await self.call(lambda: self.core.quote(nonce))
        chain = cert_to_pem(self.core.intermediate.cert) + cert_to_pem(self.core.root.cert)
        return _ok(
            {"cert": chain.decode(), "quote": wire.b64e(quote), "simulation": self.core.simulation}
        )

    async def get_manifest(self, request: web.Request) -> web.Response:
        raw, fp, sig = await self.call(self.core.get_manifest)
        return _ok(
            {
                "manifest": wire.b64e(raw),
                "manifestFingerprint": fp,
                "manifestSignatureRootECDSA": wire.b64e(sig),
            }
        )

    async def set_manifest(self, request: web.Request) -> web.Response:
        body = await _json(request)
        raw = _field_b64(body, "manifest")
        now = datetime.now(UTC)
        manifest = await self.call(lambda: self.core.set_manifest(raw, now=now))
        log.info("manifest accepted", extra={"fingerprint": manifest.fingerprint})
        return _ok({"RecoverySecrets": {}})

    async def nonce(self, request: web.Request) -> web.Response:
        now = datetime.now(UTC)
        nonce = await self.call(lambda: self.core.new_nonce(now=now))
        return _ok({"nonce": wire.b64e(nonce)})

    async def activate(self, request: web.Request) -> web.Response:
        body = await _json(request)
        req = ActivationRequest(
            marble_type=_field_str(body, "marbleType"),
            uuid=_field_str(body, "uuid"),
            csr_pem=_field_str(body, "csr").encode(),
            quote=_field_b64(body, "quote"),
            nonce=_field_b64(body, "nonce"),
        )
        now = datetime.now(UTC)
        peer = request.remote
        try:
            result = await self.call(lambda: self.core.activate(req, now=now))
        except MeshError as exc:
            log.warning(
                "activation refused",
                extra={
                    "marble_type": req.marble_type,
                    "uuid": req.uuid,
                    "reason": str(exc),
                    "remote": peer,
                },
            )
            raise
        manifest = self.core.manifest
        assert manifest is not None
        log.info(
            "marble activated",
            extra={"marble_type": req.marble_type, "uuid": req.uuid, "simulated": result.simulated},
        )
        p = result.parameters
        return _ok(
            {
                "certificate": result.leaf_pem.decode(),
                "intermediate": cert_to_pem(self.core.intermediate.cert).decode(),
                "root": cert_to_pem(self.core.root.cert).decode(),
                "parameters": {
                    "files": {k: wire.b64e(v) for k, v in p.files.items()},
                    "env": {k: wire.b64e(v) for k, v in p.env.items()},
                    "argv": list(p.argv),
                },
                "mesh": {
                    "trustDomain": manifest.mesh.trust_domain,
                    "allow": {k: list(v) for k, v in manifest.mesh.allow.items()},
                },
                "simulation": result.simulated,
            }
        )


def _ok(data: Any) -> web.Response:
    return web.json_response(wire.success(data))


def _b64url(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _BadRequest("request body is not JSON") from None
    if not isinstance(body, dict):
        raise _BadRequest("request body must be a JSON object")
    return body


def _field_str(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _BadRequest(f"field {name!r} is missing or not a string")
    return value


def _field_b64(body: dict[str, Any], name: str) -> bytes:
    try:
        return wire.b64d(body.get(name), f"field {name!r}")
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None


class _BadRequest(MeshError):
    pass


_STATUS: tuple[tuple[type[MeshError], int], ...] = (
    (_BadRequest, 400),
    (ManifestError, 400),
    (PolicyError, 403),
    (AttestationError, 403),
    (StateError, 409),
    (StoreError, 500),
)


@web.middleware
async def _jsend_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(wire.error(exc.reason), status=exc.status)
    except MeshError as exc:
        status = next((s for cls, s in _STATUS if isinstance(exc, cls)), 500)
        body = wire.fail(str(exc)) if status < 500 else wire.error(str(exc))
        if status >= 500:
            log.error("request failed", extra={"path": request.path, "reason": str(exc)})
        return web.json_response(body, status=status)
