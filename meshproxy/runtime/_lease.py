"""A certificate's lease: when the proxy renews it (``_renew``) and when it ends.

Its own module: the attestation agent computes the lease of the leaf it received without
loading the renewal schedule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509

RENEW_FRACTION = 0.7


@dataclass(frozen=True)
class Lease:
    """The current certificate's validity (epoch seconds) and its intermediate."""

    not_before: float
    not_after: float
    intermediate: str  # SHA-256 fingerprint (hex) of the intermediate that issued it

    def renew_at(self, fraction: float = RENEW_FRACTION) -> float:
        return self.not_before + fraction * (self.not_after - self.not_before)


def lease_of(
    leaf: x509.Certificate, intermediate: x509.Certificate, *, now: float | None = None
) -> Lease:
    """The lease of a leaf received ``now``. Leaves are backdated (clock skew between
    nodes), so their lifetime counts from when we got them, not from notBefore: 70 % of
    a backdated one could already be past, and the proxy would renew without end."""
    from cryptography.hazmat.primitives.hashes import SHA256

    received = time.time() if now is None else now
    return Lease(
        not_before=max(leaf.not_valid_before_utc.timestamp(), received),
        not_after=leaf.not_valid_after_utc.timestamp(),
        intermediate=intermediate.fingerprint(SHA256()).hex(),
    )
