"""The JSON shapes of the coordinator's REST API (MarbleRun's /api/v2 and JSend envelope).

Shared by the server adapter and the client so the two cannot drift apart.
"""

from __future__ import annotations

import base64
from typing import Any

from meshproxy.errors import ConnectError

CLIENT_PATHS = {
    "quote": "/api/v2/quote",
    "manifest": "/api/v2/manifest",
    "status": "/api/v2/status",
    "secrets": "/api/v2/secrets",
    "update": "/api/v2/update",
    "update_manifest": "/api/v2/update-manifest",
    "update_cancel": "/api/v2/update-cancel",
    "recover": "/api/v2/recover",
}
MESH_PATHS = {
    "quote": "/api/v2/quote",
    "status": "/api/v2/status",
    "nonce": "/api/v2/marble/nonce",
    "activate": "/api/v2/marble/activate",
    "renew": "/api/v2/marble/renew",
    "replica_key": "/api/v2/replica/key",
}
OWNER_TOKEN_HEADER = "Authorization"  # noqa: S105 ("Bearer <token>", first manifest set)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64d(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"{what} is not valid base64") from None


def success(data: Any) -> dict[str, Any]:
    return {"status": "success", "data": data}


def fail(message: str) -> dict[str, Any]:
    return {"status": "fail", "data": None, "message": message}


def error(message: str) -> dict[str, Any]:
    return {"status": "error", "message": message}


def unwrap(doc: Any, where: str) -> Any:
    """The ``data`` of a JSend success; ``ConnectError`` if the peer spoke something else."""
    if not isinstance(doc, dict) or doc.get("status") not in ("success", "fail", "error"):
        raise ConnectError(
            f"{where}: answer is not a JSend envelope: the peer is not a coordinator"
        )
    return doc
