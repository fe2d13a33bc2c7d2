"""How long a charge waits before its next try: small named policies, as in tenacity's wait.py."""

from __future__ import annotations

import random

# A deferred charge wakes within this share of its countdown after the earliest moment, so a
# backlog deferred together does not arrive in one instant; capped in seconds.
DEFERRAL_SPREAD = 0.1
DEFERRAL_SPREAD_MAX = 5.0
MIN_SPREAD = 0.05


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Return the wait after failed attempt n: exponential, capped, with equal jitter."""
    rng = rng or random.Random()
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


def deferral(retry_after: float, timeout: float, rng: random.Random | None = None) -> float:
    """Return the countdown of a charge refused by its breaker: retry_after plus a spread."""
    rng = rng or random.Random()
    spread = min(DEFERRAL_SPREAD_MAX, max(MIN_SPREAD, timeout * DEFERRAL_SPREAD))
    return max(0.0, retry_after) + rng.uniform(0, spread)
