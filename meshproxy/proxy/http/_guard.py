"""The rapid-reset guard (CVE-2023-44487): a token bucket over streams a peer resets.

Opening a stream and resetting it at once costs the attacker two frames and the server a
whole request; the concurrent-stream limit does not help because a reset frees the slot.
So every stream the peer resets spends a token; tokens refill at ``rate`` per second up
to ``burst``. An empty bucket means the connection gets GOAWAY ENHANCE_YOUR_CALM and is
closed. Sans-IO: the time is an argument.
"""

from __future__ import annotations


class ResetBudget:
    def __init__(self, burst: int, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self._tokens = float(burst)
        self._at = now
        self.spent = 0

    def spend(self, now: float) -> bool:
        """Record one reset stream; False once the peer is over its budget."""
        elapsed = max(0.0, now - self._at)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._at = now
        self.spent += 1
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
