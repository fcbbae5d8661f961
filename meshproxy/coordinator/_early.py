"""The coordinator's quote, fetched while the attestation agent is still loading.

A marble that has not pinned the coordinator's root starts its activation with
``GET /api/v2/quote?nonce=...`` over an unverified TLS connection (``client._evidence``
then verifies the quote, and pins the root it binds). That request needs only ``ssl`` and
``http.client``, not ``cryptography`` or the attestation package, which the agent spends
most of its start loading. So ``EarlyQuote`` sends it from a thread at once, and the wait
for the coordinator (connect, handshake, answer) overlaps the loading.

Nothing received here is trusted more than before: the answer goes through the very checks
of a quote fetched later (``client._evidence``), and the connection is used further only
if ``Connection.pin`` accepts the certificate it was handshaken with. A failure here is not
reported: the activation then fetches the quote itself, and says what is wrong then.
"""

from __future__ import annotations

import base64
import http.client
import os
import ssl
import threading
from dataclasses import dataclass, field

from meshproxy.coordinator import _wire as wire

TIMEOUT = 10.0  # connect, handshake, answer: as one activation attempt (runtime._activate)


def client_context(root_pem: str | None) -> ssl.SSLContext:
    """TLS to a coordinator: verified against ``root_pem``, or with none not verified
    (only to fetch a quote, which the caller verifies before pinning its root)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # identity is the pinned root itself, checked by the caller
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if root_pem is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=root_pem)
    return ctx


def quote_path(nonce: bytes) -> str:
    """The path of the client API's quote request over ``nonce``."""
    q = base64.urlsafe_b64encode(nonce).decode().rstrip("=")
    return f"{wire.CLIENT_PATHS['quote']}?nonce={q}"


@dataclass(frozen=True)
class Answer:
    """A quote request's answer, not yet checked: the connection it came on (open, to be
    kept if the answer allows it), our nonce, the HTTP status and body."""

    conn: http.client.HTTPSConnection = field(repr=False)
    nonce: bytes
    status: int
    body: bytes = field(repr=False)
    will_close: bool


class EarlyQuote:
    """``GET`` the coordinator's quote over a fresh nonce from a thread, started now."""

    def __init__(self, host: str, port: int, timeout: float = TIMEOUT) -> None:
        self._answer: Answer | None = None
        self._thread = threading.Thread(
            target=self._fetch, args=(host, port, timeout), name="early-quote", daemon=True
        )
        self._thread.start()

    def _fetch(self, host: str, port: int, timeout: float) -> None:
        conn = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=client_context(None)
        )
        try:
            nonce = os.urandom(32)
            conn.request("GET", quote_path(nonce))
            resp = conn.getresponse()
            body = resp.read()
            self._answer = Answer(conn, nonce, resp.status, body, resp.will_close)
        except (OSError, http.client.HTTPException, ValueError):
            conn.close()  # the activation asks again, and reports what fails then

    def take(self, timeout: float) -> Answer | None:
        """The answer, once (``None``: none came in ``timeout`` or the request failed; a
        connection still in the making is then left to its thread, which is a daemon)."""
        self._thread.join(timeout)
        answer, self._answer = self._answer, None
        return None if self._thread.is_alive() else answer
