"""aiohttp adapter: HTTP requests in, core calls on the core's worker thread, JSend out.

Two applications share one core: the client API (operators and users; default :4433) and
the mesh API (marbles and peer replicas; default :2001). Both present the root
certificate, which is what a client pins after verifying the coordinator's quote.

Client API (MarbleRun's ``/api/v2`` shapes; "user" = a manifest user's client certificate):

* ``GET quote[?nonce=]``, ``GET status``, ``GET manifest``: public;
* ``POST manifest`` ``{"manifest": b64}`` -> ``{"RecoverySecrets": {key: b64}}``: the
  first manifest (the owner's certificate or ``Authorization: Bearer <token>`` if the
  coordinator has an owner);
* ``GET secrets?s=NAME...`` (user, ReadSecret) -> ``{"secrets": {NAME: Secret}}``;
  ``POST secrets`` ``{"secrets": {NAME: {Key | Cert, Private}}}`` (user, WriteSecret);
* ``GET update`` -> ``{"updateLog": [json line, ...]}``; ``POST update`` ``{"manifest"}``
  (user): a package update, or the start of a full update ->
  ``{"message", "missingAcknowledgments", "missingUsers", "recoverySecrets"?}``;
* ``GET update-manifest`` (the pending update), ``POST update-manifest`` ``{"manifest"}``
  (user: acknowledge), ``POST update-cancel`` (user);
* ``POST recover`` ``{"recoverySecret": b64, "recoverySecretSignature": b64}`` ->
  ``{"remaining", "message"}`` (recovery mode).

Mesh API:

* ``POST marble/nonce`` -> ``{"nonce"}``; ``POST marble/activate`` ``{"marbleType",
  "uuid", "csr", "quote", "nonce"}`` -> certificate, intermediate, root, parameters, mesh,
  sealingKey (the marble's 16-byte virtual sealing key, base64);
* ``POST marble/renew``: the same request as activate, with a fresh nonce and quote, by a
  running marble -> ``{"certificate", "intermediate", "root", "mesh", "simulation"}``: a
  new leaf under the current intermediate (not counted against MaxActivations; for a
  counted marble type only for a UUID this cluster activated), or a JSend fail with the
  reason when the marble no longer satisfies the manifest (HTTP 403);
* ``POST replica/key``: an attested peer replica asks for the state key (``_replica``).

Nonces are stateless MACs under a key every replica of a cluster derives (``_nonce``): a
marble may get its nonce from one replica and activate or renew at another; each nonce is
accepted once across all replicas (claims in etcd).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from meshproxy.coordinator import _wire as wire
from meshproxy.coordinator._admin import Admin, NotFound, UpdateStatus
from meshproxy.coordinator._auth import Unauthenticated
from meshproxy.coordinator._core import ActivationRequest, ActivationResult, CoordinatorCore
from meshproxy.coordinator._usersecrets import BadUpload
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
KeyServer = Callable[[dict[str, Any]], dict[str, Any]]
Answer = tuple[ActivationResult, tuple[str, str, dict[str, Any]]]
MAX_BODY = 1 << 20
MAX_BATCH = 32  # activations handed to the core together (one commit)


class Api:
    def __init__(self, core: CoordinatorCore) -> None:
        self.core = core
        self.admin = Admin(core)
        self.key_server: KeyServer | None = None  # set by a replica that shares its key
        # One worker thread is the core's mutex and keeps crypto off the event loop.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="core")
        # Activations waiting for the worker go to it together (one hop, one commit).
        self._queued: list[tuple[ActivationRequest, datetime, asyncio.Future[Answer]]] = []
        self._draining = False
        self._drainer: asyncio.Task[None] | None = None  # a reference keeps the task alive
        self._parts: tuple[tuple[object, ...], tuple[str, str, dict[str, Any]]] | None = None

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # -- applications ----------------------------------------------------------------------
    def client_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_jsend_errors])
        paths = wire.CLIENT_PATHS
        app.router.add_get(paths["quote"], self.quote)
        app.router.add_get(paths["manifest"], self.get_manifest)
        app.router.add_post(paths["manifest"], self.set_manifest)
        app.router.add_get(paths["status"], self.status)
        app.router.add_get(paths["secrets"], self.get_secrets)
        app.router.add_post(paths["secrets"], self.set_secrets)
        app.router.add_get(paths["update"], self.update_log)
        app.router.add_post(paths["update"], self.update)
        app.router.add_get(paths["update_manifest"], self.pending_update)
        app.router.add_post(paths["update_manifest"], self.acknowledge)
        app.router.add_post(paths["update_cancel"], self.cancel_update)
        app.router.add_post(paths["recover"], self.recover)
        return app

    def mesh_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_jsend_errors])
        app.router.add_get(wire.MESH_PATHS["quote"], self.quote)
        app.router.add_get(wire.MESH_PATHS["status"], self.status)
        app.router.add_post(wire.MESH_PATHS["nonce"], self.nonce)
        app.router.add_post(wire.MESH_PATHS["activate"], self.activate)
        app.router.add_post(wire.MESH_PATHS["renew"], self.renew)
        app.router.add_post(wire.MESH_PATHS["replica_key"], self.replica_key)
        return app

    # -- public handlers ---------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        from cryptography.hazmat.primitives.hashes import SHA256

        await self.call(self.core.sync)
        code, message = self.core.status()
        # Running marbles poll this to learn of an update (a new intermediate) and renew.
        intermediate = self.core.intermediate.cert.fingerprint(SHA256()).hex()
        return _ok(
            {
                "code": code,
                "message": message,
                "simulation": self.core.simulation,
                "activations": self.core.activation_counts(),
                "intermediate": intermediate,
            }
        )

    async def quote(self, request: web.Request) -> web.Response:
        nonce_text = request.query.get("nonce", "")
        try:
            nonce = _b64url(nonce_text) if nonce_text else b""
        except ValueError:
            raise PolicyError("query parameter nonce is not base64url") from None

        def work() -> tuple[bytes, bytes]:
            self.core.sync()
            chain = cert_to_pem(self.core.intermediate.cert) + cert_to_pem(self.core.root.cert)
            return self.core.quote(nonce), chain

        quote, chain = await self.call(work)
        return _ok(
            {"cert": chain.decode(), "quote": wire.b64e(quote), "simulation": self.core.simulation}
        )

    async def get_manifest(self, request: web.Request) -> web.Response:
        def work() -> tuple[bytes, str, bytes]:
            self.core.sync()
            return self.core.get_manifest()

        raw, fp, sig = await self.call(work)
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
        cert = _peer_cert(request)
        token = _bearer(request)
        now = datetime.now(UTC)
        result = await self.call(
            lambda: self.core.initialize(raw, now=now, cert_der=cert, token=token)
        )
        log.info("manifest accepted", extra={"fingerprint": result.manifest.fingerprint})
        return _ok(
            {"RecoverySecrets": {k: wire.b64e(v) for k, v in result.recovery_secrets.items()}}
        )

    async def update_log(self, request: web.Request) -> web.Response:
        lines = await self.call(self.admin.update_log)
        return _ok({"updateLog": lines})

    async def pending_update(self, request: web.Request) -> web.Response:
        raw, missing, users = await self.call(self.admin.pending)
        return _ok(
            {
                "manifest": wire.b64e(raw),
                "message": f"Pending manifest update; {missing} acknowledgement(s) missing.",
                "missingAcknowledgments": missing,
                "missingUsers": list(users),
            }
        )

    async def recover(self, request: web.Request) -> web.Response:
        body = await _json(request)
        share = _field_b64(body, "recoverySecret")
        signature = _field_b64(body, "recoverySecretSignature")
        now = datetime.now(UTC)
        remaining, message = await self.call(lambda: self.core.recover(share, signature, now=now))
        return _ok({"remaining": remaining, "message": message})

    # -- user handlers ---------------------------------------------------------------------
    async def get_secrets(self, request: web.Request) -> web.Response:
        names = request.query.getall("s", [])
        cert, now = _peer_cert(request), datetime.now(UTC)
        secrets = await self.call(lambda: self.admin.get_secrets(cert, names, now=now))
        return _ok({"secrets": secrets})

    async def set_secrets(self, request: web.Request) -> web.Response:
        body = await _json(request)
        uploads = body.get("secrets")
        if not isinstance(uploads, dict):
            raise _BadRequest("field 'secrets' must be an object of secret name -> value")
        cert, now = _peer_cert(request), datetime.now(UTC)
        await self.call(lambda: self.admin.set_secrets(cert, uploads, now=now))
        return _ok(None)

    async def update(self, request: web.Request) -> web.Response:
        body = await _json(request)
        raw = _field_b64(body, "manifest")
        cert, now = _peer_cert(request), datetime.now(UTC)
        status = await self.call(lambda: self.admin.update(cert, raw, now=now))
        return _ok(_update_status(status))

    async def acknowledge(self, request: web.Request) -> web.Response:
        body = await _json(request)
        raw = _field_b64(body, "manifest")
        cert, now = _peer_cert(request), datetime.now(UTC)
        status = await self.call(lambda: self.admin.acknowledge(cert, raw, now=now))
        return _ok(_update_status(status))

    async def cancel_update(self, request: web.Request) -> web.Response:
        cert, now = _peer_cert(request), datetime.now(UTC)
        await self.call(lambda: self.admin.cancel(cert, now=now))
        return _ok({"message": "Update successfully cancelled"})

    # -- mesh handlers -----------------------------------------------------------------------
    async def nonce(self, request: web.Request) -> web.Response:
        now = datetime.now(UTC)
        if self.core.shares_store:  # first adopt what other replicas committed

            def work() -> bytes:
                self.core.sync()
                return self.core.new_nonce(now=now)

            nonce = await self.call(work)
        else:  # an HMAC under the state's root secret: no need to queue for the worker
            nonce = self.core.new_nonce(now=now)
        return _ok({"nonce": wire.b64e(nonce)})

    def _activation_request(self, body: dict[str, Any]) -> ActivationRequest:
        return ActivationRequest(
            marble_type=_field_str(body, "marbleType"),
            uuid=_field_str(body, "uuid"),
            csr_pem=_field_str(body, "csr").encode(),
            quote=_field_b64(body, "quote"),
            nonce=_field_b64(body, "nonce"),
        )

    def _mesh(self) -> dict[str, Any]:
        manifest = self.core.manifest
        assert manifest is not None
        return {
            "trustDomain": manifest.mesh.trust_domain,
            "allow": {k: list(v) for k, v in manifest.mesh.allow.items()},
            "routes": {
                marble: [
                    {
                        "path": r.path,
                        "pathPrefix": r.path_prefix,
                        "methods": list(r.methods),
                        "allow": list(r.allow),
                    }
                    for r in rules
                ]
                for marble, rules in manifest.mesh.routes.items()
            },
        }

    async def activate(self, request: web.Request) -> web.Response:
        req = self._activation_request(await _json(request))
        now = datetime.now(UTC)
        peer = request.remote
        try:
            result, (inter, root, mesh) = await self._activate(req, now)
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
        log.info(
            "marble activated",
            extra={"marble_type": req.marble_type, "uuid": req.uuid, "simulated": result.simulated},
        )
        p = result.parameters
        return _ok(
            {
                "certificate": result.leaf_pem.decode(),
                "intermediate": inter,
                "root": root,
                "parameters": {
                    "files": {k: wire.b64e(v) for k, v in p.files.items()},
                    "env": {k: wire.b64e(v) for k, v in p.env.items()},
                    "argv": list(p.argv),
                },
                "mesh": mesh,
                "simulation": result.simulated,
                "sealingKey": wire.b64e(result.sealing_key.reveal()),
            }
        )

    async def _activate(self, req: ActivationRequest, now: datetime) -> Answer:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queued.append((req, now, future))
        if not self._draining:
            self._draining = True
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Hand every queued activation to the worker at once, until none is left."""
        try:
            while self._queued:
                # Bounded, so the first of many waiting marbles is not held up by the last.
                batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
                try:
                    outcomes = await self.call(functools.partial(self._activate_batch, batch))
                except BaseException as exc:  # a bug: every waiter of the batch gets it
                    for *_, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    raise
                for (*_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # the client went away
                        continue
                    if isinstance(outcome, MeshError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._draining = False

    def _activate_batch(
        self, batch: list[tuple[ActivationRequest, datetime, asyncio.Future[Answer]]]
    ) -> list[Answer | MeshError]:
        results = self.core.activate_many([(req, now) for req, now, _ in batch])
        parts = self._answer_parts()
        return [r if isinstance(r, MeshError) else (r, parts) for r in results]

    def _answer_parts(self) -> tuple[str, str, dict[str, Any]]:
        """Intermediate and root PEM and the mesh policy, made again only when they change."""
        key = (self.core.intermediate.cert, self.core.root.cert, self.core.manifest)
        if self._parts is None or any(a is not b for a, b in zip(key, self._parts[0], strict=True)):
            inter = cert_to_pem(self.core.intermediate.cert).decode()
            root = cert_to_pem(self.core.root.cert).decode()
            self._parts = (key, (inter, root, self._mesh()))
        return self._parts[1]

    async def renew(self, request: web.Request) -> web.Response:
        req = self._activation_request(await _json(request))
        now = datetime.now(UTC)
        try:
            result, inter, root, mesh = await self.call(
                lambda: (
                    self.core.renew(req, now=now),
                    cert_to_pem(self.core.intermediate.cert).decode(),
                    cert_to_pem(self.core.root.cert).decode(),
                    self._mesh(),
                )
            )
        except MeshError as exc:
            log.warning(
                "renewal refused",
                extra={"marble_type": req.marble_type, "uuid": req.uuid, "reason": str(exc)},
            )
            raise
        log.info("marble renewed", extra={"marble_type": req.marble_type, "uuid": req.uuid})
        return _ok(
            {
                "certificate": result.leaf_pem.decode(),
                "intermediate": inter,
                "root": root,
                "mesh": mesh,
                "simulation": result.simulated,
            }
        )

    async def replica_key(self, request: web.Request) -> web.Response:
        server = self.key_server
        if server is None:
            raise StateError("this coordinator does not share its state key (not a replica)")
        body = await _json(request)
        answer = await self.call(lambda: server(body))
        log.info("state key shared with a peer replica", extra={"remote": request.remote})
        return _ok(answer)


def _update_status(status: UpdateStatus) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "message": status.message,
        "missingAcknowledgments": status.missing_acks,
        "missingUsers": list(status.missing_users),
    }
    if status.recovery_secrets:
        doc["recoverySecrets"] = {k: wire.b64e(v) for k, v in status.recovery_secrets.items()}
    return doc


def _ok(data: Any) -> web.Response:
    return web.json_response(wire.success(data))


def _peer_cert(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return bytes(der) if der else None


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get(wire.OWNER_TOKEN_HEADER, "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


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
    (BadUpload, 400),
    (ManifestError, 400),
    (Unauthenticated, 401),
    (NotFound, 404),
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
