"""Certificate renewal of a running marble (issue 6; ARCHITECTURE's rotation).

The proxy renews its leaf at 70 % of the leaf's lifetime, and promptly after a manifest
update. It learns of an update by polling the mesh API's ``GET /api/v2/status``, whose
``intermediate`` field is the SHA-256 fingerprint of the cluster's current intermediate:
every update (package SecurityVersion or full manifest) creates a new intermediate, and
marbles trust only the current one, so a marble still under the old intermediate can no
longer talk to marbles activated after the update. The poll is a small HTTPS GET pinned
to the root (no quote, nothing written), every ``coordinator.update_poll`` (10 s by
default, +-20 % so that marbles started together spread their polls).

A renewal is a fresh key, a CSR and a quote binding that key (``client.renew``, ``POST
/api/v2/marble/renew``). New connections then use contexts of the new identity; open
connections keep the TLS session (and certificate) they were made with; the app is not
restarted. A refusal (the marble no longer satisfies the manifest) is logged as an error
with the coordinator's reason and retried with backoff; when the certificate expires
the listeners are closed (connections are refused) and open connections are cut, until
a later renewal succeeds and the listeners open again.

``next_step`` is the whole schedule as a pure function of the time and what is known;
``Renewer`` runs it with the I/O passed in, so both are tested without a coordinator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from meshproxy.errors import CoordinatorError, MeshError
from meshproxy.runtime._lease import RENEW_FRACTION, Lease, lease_of

__all__ = ["RENEW_FRACTION", "Lease", "Renewed", "Renewer", "Step", "lease_of", "next_step"]

log = logging.getLogger("meshproxy.runtime.renew")

UPDATE_POLL = 10.0  # the default of coordinator.update_poll
POLL_JITTER = 0.2  # each interval is +-20 %: marbles started together do not poll together
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


@dataclass(frozen=True)
class Step:
    """What to do now: ``renew``, ``expire`` (cut off), ``poll`` the coordinator, or
    ``wait`` ``delay`` seconds (then ask again)."""

    action: str
    delay: float = 0.0


def next_step(
    now: float,
    lease: Lease,
    *,
    update_seen: bool,
    expired: bool,
    retry_at: float | None,
    poll_at: float,
) -> Step:
    """The schedule. ``retry_at``: after a failed renewal, not before then."""
    if now >= lease.not_after and not expired:
        return Step("expire")
    due = update_seen or expired or now >= lease.renew_at()
    if due and (retry_at is None or now >= retry_at):
        return Step("renew")
    if not update_seen and not expired and now >= poll_at:
        return Step("poll")
    wake = [poll_at] if not update_seen and not expired else []
    wake.append(lease.renew_at() if retry_at is None else retry_at)
    if not expired:
        wake.append(lease.not_after)
    return Step("wait", max(0.0, min(wake) - now))


def _jitter() -> float:
    import random

    return random.uniform(1 - POLL_JITTER, 1 + POLL_JITTER)  # noqa: S311 (spreading load)


@dataclass(frozen=True)
class Renewed:
    """What a successful renewal hands to the data plane (opaque here)."""

    lease: Lease
    payload: object  # the runtime's new identity and mesh policy


class Renewer:
    """Runs ``next_step`` until cancelled. The callables do the I/O:

    ``renew()``: attest again and return the new lease and identity (raises
    ``CoordinatorError`` when refused, ``MeshError`` when unreachable);
    ``current_intermediate()``: the cluster's intermediate fingerprint, None if unknown;
    ``apply(renewed)``: new connections use it; ``cut_off()``: the certificate expired.
    """

    def __init__(
        self,
        lease: Lease,
        *,
        renew: Callable[[], Awaitable[Renewed]],
        current_intermediate: Callable[[], Awaitable[str | None]],
        apply: Callable[[Renewed], Awaitable[None]],
        cut_off: Callable[[], Awaitable[None]],
        clock: Callable[[], float] = time.time,
        poll: float = UPDATE_POLL,
        jitter: Callable[[], float] | None = None,
    ) -> None:
        self.lease = lease
        self._renew = renew
        self._current = current_intermediate
        self._apply = apply
        self._cut_off = cut_off
        self._clock = clock
        self._poll = poll
        self._jitter = jitter or _jitter
        self.expired = False
        self.renewals = 0
        self.refusals = 0

    async def run(self) -> None:
        # asyncio is loaded here, not at import: the attestation agent imports this module
        # for ``lease_of`` and has no event loop (the proxy has loaded asyncio long before).
        import asyncio

        update_seen = False
        retry_at: float | None = None
        backoff = RETRY_FIRST
        poll_at = self._clock() + self._poll * self._jitter()
        while True:
            now = self._clock()
            step = next_step(
                now, self.lease, update_seen=update_seen, expired=self.expired,
                retry_at=retry_at, poll_at=poll_at,
            )  # fmt: skip
            if step.action == "wait":
                await asyncio.sleep(step.delay)
            elif step.action == "expire":
                self.expired = True
                log.error(
                    "certificate expired without renewal: listeners closed, connections cut",
                    extra={"event": "renewal.expired", "not_after": self.lease.not_after},
                )
                await self._cut_off()
            elif step.action == "poll":
                poll_at = now + self._poll * self._jitter()
                seen = await self._poll_once()
                if seen is not None and seen != self.lease.intermediate:
                    update_seen = True
                    log.info(
                        "the cluster has a new intermediate (a manifest update): renewing",
                        extra={"event": "renewal.update", "intermediate": seen},
                    )
            else:
                try:
                    renewed = await self._renew()
                except MeshError as exc:
                    retry_at = self._clock() + backoff
                    self._failed(exc, backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
                    continue
                try:
                    await self._apply(renewed)
                except MeshError as exc:  # e.g. a certificate the TLS library refuses
                    retry_at = self._clock() + backoff
                    self._failed(exc, backoff)
                    backoff = min(backoff * 2, RETRY_MAX)
                    continue
                old, self.lease = self.lease, renewed.lease
                self.renewals += 1
                log.info(
                    "certificate renewed",
                    extra={"event": "renewal.done", "not_after": self.lease.not_after,
                           "new_intermediate": old.intermediate != self.lease.intermediate,
                           "was_expired": self.expired},
                )  # fmt: skip
                self.expired = False
                update_seen, retry_at, backoff = False, None, RETRY_FIRST
                poll_at = self._clock() + self._poll * self._jitter()

    async def _poll_once(self) -> str | None:
        try:
            return await self._current()
        except MeshError as exc:
            log.debug("update poll failed", extra={"event": "renewal.poll_failed",
                                                   "reason": str(exc)})  # fmt: skip
            return None

    def _failed(self, exc: MeshError, retry_in: float) -> None:
        left = self.lease.not_after - self._clock()
        fields = {"reason": str(exc), "retry_in_s": retry_in,
                  "expires_in_s": round(left, 1), "expired": self.expired}  # fmt: skip
        status = getattr(exc, "http_status", None)
        if isinstance(exc, CoordinatorError) and status is not None and 400 <= status < 500:
            self.refusals += 1
            log.error(
                "RENEWAL REFUSED: this marble no longer satisfies the manifest; it stops "
                "serving when its certificate expires",
                extra={"event": "renewal.refused", "http_status": status, **fields},
            )
        else:
            log.warning("renewal failed; retrying",
                        extra={"event": "renewal.retry", **fields})  # fmt: skip


# -- the coordinator side (blocking: run in a thread) ----------------------------------------
