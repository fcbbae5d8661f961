"""The etcd store: coordinator replicas share one sealed state with compare-and-swap.

Talks to etcd's v3 HTTP/JSON gateway (``/v3/kv/range``, ``/v3/kv/txn``, ...; keys and
values base64, 64-bit numbers as strings) with the standard library, so no client package
is needed. Blocking: it runs on the core's worker thread.

Keys under the prefix (default ``/meshproxy/``): ``state`` holds the sealed state; every
write is a transaction comparing the key's ``mod_revision`` with the revision the writer
read (0 = absent), so a replica that read stale state loses with ``StoreConflict`` and
recomputes. ``members/<id>`` holds each replica's mesh address, so that a new replica can
find a peer to ask for the state key. ``nonces/<id>`` records each activation nonce used
(``_nonce``), created only if absent and kept under a lease that outlives the nonce, so a
nonce is accepted once across all replicas. Endpoints are tried in turn until one answers.

TLS: ``https://`` endpoints are verified against ``ca`` (default: the system's CAs); with
``cert`` and ``key`` the store presents a client certificate (etcd ``--client-cert-auth``).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from meshproxy.coordinator._store import StoreConflict
from meshproxy.errors import StoreError


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix"."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


_REUSE_IDLE = 5.0  # seconds a kept connection may idle before a new one is made instead
_TXN_OPS = 64  # etcd refuses transactions of more than 128 operations by default


@dataclass(frozen=True)
class EtcdTLS:
    """Files for TLS to etcd: CA bundle to verify it, client certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        if (self.cert is None) != (self.key is None):
            raise StoreError("--etcd-cert and --etcd-key go together: give both or neither")
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        except (OSError, ssl.SSLError) as exc:
            raise StoreError(f"--etcd-ca {self.ca}: {_ssl_reason(exc)}") from None
        if self.cert is not None and self.key is not None:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise StoreError(
                    f"--etcd-cert {self.cert} with --etcd-key {self.key}: {_ssl_reason(exc)}"
                ) from None
        return ctx


class _NotSent(Exception):
    """The request cannot have reached etcd (connecting or sending failed)."""


class _Lost(Exception):
    """The request was sent; its answer did not come back."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = f"TLS failed ({_ssl_reason(exc)})"
        if "ALERT" in reason:
            reason += ": etcd refused this client (--etcd-cert/--etcd-key)"
        return reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return getattr(exc, "strerror", None) or str(exc)


class EtcdStore:
    shared = True

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = "/meshproxy/",
        timeout: float = 5.0,
        tls: EtcdTLS | None = None,
    ) -> None:
        if not endpoints:
            raise StoreError("--etcd-endpoints: at least one URL is needed")
        for url in endpoints:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise StoreError(f"etcd endpoint {url!r} is not an http(s)://HOST:PORT URL")
        tls = tls or EtcdTLS()
        if tls != EtcdTLS() and not all(u.startswith("https://") for u in endpoints):
            raise StoreError(
                "--etcd-ca/--etcd-cert/--etcd-key are for TLS: every --etcd-endpoints URL "
                "must then be https://"
            )
        self._ssl = tls.context()
        self.endpoints = [u.rstrip("/") for u in endpoints]
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.timeout = timeout
        self._good = 0
        self._key = f"{self.prefix}state".encode()
        self._lease: tuple[str, datetime] | None = None  # nonce claims: id, valid until
        self._base = [urlsplit(u).path.rstrip("/") for u in self.endpoints]
        self._conns: dict[int, tuple[http.client.HTTPConnection, float]] = {}  # kept, last use
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"etcd {self._key.decode()} at {', '.join(self.endpoints)}"

    def __repr__(self) -> str:
        return f"<EtcdStore {self.where}>"

    # -- transport -----------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the first endpoint that answers, over a kept connection when there is one.

        Another endpoint is tried only when the request cannot have reached etcd (the
        connection or the sending failed). A transaction whose answer was lost after it
        was sent may have been applied: sent again it would lose its compare (its own
        write changed the revision) and a compare-and-swap caller would count twice, so
        that is a ``StoreError`` ("outcome unknown") instead. Other requests (reads,
        idempotent writes) are sent once more on a new connection."""
        payload = json.dumps(body).encode()
        errors = []
        with self._lock:
            for i in range(len(self.endpoints)):
                index = (self._good + i) % len(self.endpoints)
                url = self.endpoints[index] + path
                try:
                    try:
                        status, raw = self._exchange(index, path, payload)
                    except _Lost as exc:
                        if path == "/v3/kv/txn":
                            raise StoreError(
                                f"etcd {url}: the answer to a transaction was lost ({exc}); "
                                "its outcome is unknown"
                            ) from None
                        status, raw = self._exchange(index, path, payload)
                except (_NotSent, _Lost) as exc:
                    errors.append(f"{self.endpoints[index]}: {exc}")
                    continue
                if status != 200:
                    detail = raw[:200].decode("utf-8", "replace")
                    raise StoreError(f"etcd {url}: HTTP {status}: {detail}")
                try:
                    doc = json.loads(raw)
                except ValueError:
                    raise StoreError(f"etcd {url}: answer is not JSON") from None
                self._good = index
                if not isinstance(doc, dict):
                    raise StoreError(f"etcd {url}: answer is not a JSON object")
                return doc
        raise StoreError(f"etcd is unreachable ({'; '.join(errors)})")

    def _exchange(self, index: int, path: str, payload: bytes) -> tuple[int, bytes]:
        """One request and its answer; ``_NotSent`` or ``_Lost`` say how it failed."""
        kept = self._conns.pop(index, None)
        if kept is not None and time.monotonic() - kept[1] > _REUSE_IDLE:
            kept[0].close()
            kept = None
        conn = kept[0] if kept is not None else self._connect(index)
        headers = {"Content-Type": "application/json"}
        try:
            conn.request("POST", self._base[index] + path, body=payload, headers=headers)
        except OSError as exc:
            conn.close()
            if kept is None:
                raise _NotSent(_reason(exc)) from None
            return self._exchange(index, path, payload)  # it had gone stale: a new one
        try:
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _Lost(_reason(exc)) from None
        if resp.will_close:
            conn.close()
        else:
            self._conns[index] = (conn, time.monotonic())
        return resp.status, raw

    def _connect(self, index: int) -> http.client.HTTPConnection:
        parts = urlsplit(self.endpoints[index])
        host, port = parts.hostname or "", parts.port
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        try:
            conn.connect()
        except OSError as exc:
            conn.close()
            raise _NotSent(_reason(exc)) from None
        return conn

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

    # -- nonce claims (``_nonce.UsedNonces``) -----------------------------------------------
    def claim(self, ids: Iterable[bytes], expires: datetime, now: datetime) -> set[bytes]:
        """Create ``nonces/<id>`` for each id not yet there; the ids created are claimed."""
        todo = list(dict.fromkeys(ids))
        lease = self._nonce_lease(expires, now)
        claimed: set[bytes] = set()
        for i in range(0, len(todo), _TXN_OPS):
            chunk = todo[i : i + _TXN_OPS]
            if self._create_all(chunk, lease):
                claimed.update(chunk)
            elif len(chunk) > 1:  # one of them was used: claim them one by one
                claimed.update(n for n in chunk if self._create_all([n], lease))
        return claimed

    def _create_all(self, ids: list[bytes], lease: str) -> bool:
        keys = [_b64(f"{self.prefix}nonces/{n.hex()}".encode()) for n in ids]
        doc = self._post(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                    for k in keys
                ],
                "success": [{"request_put": {"key": k, "value": "", "lease": lease}} for k in keys],
            },
        )
        return bool(doc.get("succeeded"))

    def _nonce_lease(self, expires: datetime, now: datetime) -> str:
        """A lease that outlives ``expires``; one is shared by the claims of a minute."""
        if self._lease is None or self._lease[1] < expires:
            ttl = max(int((expires - now).total_seconds()), 1) * 2 + 5
            doc = self._post("/v3/lease/grant", {"TTL": str(ttl)})
            try:
                lease_id = str(int(doc["ID"]))
            except (KeyError, ValueError, TypeError):
                raise StoreError(f"{self.where}: malformed lease answer") from None
            self._lease = (lease_id, now + timedelta(seconds=ttl - 5))
        return self._lease[0]

    def close(self) -> None:
        with self._lock:
            for conn, _ in self._conns.values():
                conn.close()
            self._conns.clear()
