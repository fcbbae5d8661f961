"""The etcd store: coordinator replicas share one sealed state with compare-and-swap.

Talks to etcd's v3 HTTP/JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``, ...; keys and
values base64, 64-bit numbers as strings) with the standard library, so no client package
is needed. Blocking: it runs on the core's worker thread.

Keys under the prefix (default ``/meshproxy/``): ``state`` holds the sealed state; every
write is a transaction comparing the key's ``mod_revision`` with the revision the writer
read (0 = absent), so a replica that read stale state loses with ``StoreConflict`` and
recomputes. ``members/<id>`` holds each replica's mesh address, so that a new replica can
find a peer to ask for the state key. Endpoints are tried in turn until one answers.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from meshproxy.coordinator._store import StoreConflict
from meshproxy.errors import StoreError


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix"."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


class EtcdStore:
    shared = True

    def __init__(
        self, endpoints: Sequence[str], prefix: str = "/meshproxy/", timeout: float = 5.0
    ) -> None:
        if not endpoints:
            raise StoreError("--etcd-endpoints: at least one URL is needed")
        for url in endpoints:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise StoreError(f"etcd endpoint {url!r} is not an http(s)://HOST:PORT URL")
        self.endpoints = [u.rstrip("/") for u in endpoints]
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.timeout = timeout
        self._good = 0
        self._key = f"{self.prefix}state".encode()

    @property
    def where(self) -> str:
        return f"etcd {self._key.decode()} at {', '.join(self.endpoints)}"

    def __repr__(self) -> str:
        return f"<EtcdStore {self.where}>"

    # -- transport -----------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(body).encode()
        errors = []
        for i in range(len(self.endpoints)):
            index = (self._good + i) % len(self.endpoints)
            url = self.endpoints[index] + path
            req = urllib.request.Request(  # noqa: S310 (scheme checked in __init__)
                url, data=payload, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                    doc = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:200].decode("utf-8", "replace")
                raise StoreError(f"etcd {url}: HTTP {exc.code}: {detail}") from None
            except (OSError, ValueError) as exc:
                errors.append(f"{self.endpoints[index]}: {getattr(exc, 'reason', exc)}")
                continue
            self._good = index
            if not isinstance(doc, dict):
                raise StoreError(f"etcd {url}: answer is not a JSON object")
            return doc
        raise StoreError(f"etcd is unreachable ({'; '.join(errors)})")

    # -- the state -------------------------------------------------------------------------
    def load_versioned(self) -> tuple[bytes | None, int]:
        doc = self._post("/v3/kv/range", {"key": _b64(self._key)})
        kvs = doc.get("kvs") or []
        if not kvs:
            return None, 0
        try:
            return base64.b64decode(kvs[0].get("value", "")), int(kvs[0]["mod_revision"])
        except (KeyError, ValueError, TypeError):
            raise StoreError(f"{self.where}: malformed range answer") from None

    def save_versioned(self, blob: bytes, expected: int) -> int:
        doc = self._post(
            "/v3/kv/txn",
            {
                "compare": [
                    {
                        "key": _b64(self._key),
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": str(expected),
                    }
                ],
                "success": [{"request_put": {"key": _b64(self._key), "value": _b64(blob)}}],
            },
        )
        if not doc.get("succeeded"):
            raise StoreConflict(
                f"{self.where}: the state changed since revision {expected} (another replica)"
            )
        try:
            return int(doc["header"]["revision"])
        except (KeyError, ValueError, TypeError):
            raise StoreError(f"{self.where}: malformed transaction answer") from None

    def load(self) -> bytes | None:
        return self.load_versioned()[0]

    def save(self, blob: bytes) -> None:
        self._post("/v3/kv/put", {"key": _b64(self._key), "value": _b64(blob)})

    # -- members -------------------------------------------------------------------------------
    def register_member(self, member_id: str, address: str) -> None:
        key = f"{self.prefix}members/{member_id}".encode()
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(address.encode())})

    def unregister_member(self, member_id: str) -> None:
        key = f"{self.prefix}members/{member_id}".encode()
        self._post("/v3/kv/deleterange", {"key": _b64(key)})

    def members(self) -> dict[str, str]:
        start = f"{self.prefix}members/".encode()
        doc = self._post(
            "/v3/kv/range", {"key": _b64(start), "range_end": _b64(_prefix_end(start))}
        )
        out = {}
        for kv in doc.get("kvs") or []:
            try:
                key = base64.b64decode(kv["key"]).decode()
                out[key[len(start) :]] = base64.b64decode(kv.get("value", "")).decode()
            except (KeyError, ValueError, UnicodeDecodeError):
                continue
        return out

    def close(self) -> None:
        pass
