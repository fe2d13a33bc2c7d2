"""How long a charge waits before its next try: small named policies, as in tenacity's wait.py."""

from __future__ import annotations

import random

# A deferred charge wakes within this share of its countdown after the earliest moment, so a
# backlog deferred together does not arrive in one instant; capped in seconds.
DEFERRAL_SPREAD = 0.1
DEFERRAL_SPREAD_MAX = 5.0
MIN_SPREAD = 0.05

# Waits of a charge that cannot go on now, for a reason other than its breaker.
STORE_RETRY_SECONDS = 2.0  # the order book (Redis) cannot be reached before the call
BUSY_RETRY_SECONDS = 1.0  # another message holds the order (at most; its lock may end sooner)
STALE_RETRY_SECONDS = 0.5  # another message took the order between begin and attempt
# Waits between tries to record an outcome the provider gave: it is money that moved.
RECORD_RETRY_WAITS = (0.05, 0.25, 1.0)
# Waits between tries to publish a reschedule the broker refused (a broker at maxmemory
# refuses every write): about 4 s in all, then the original goes back to the broker.
PUBLISH_RETRY_WAITS = (0.2, 0.5, 1.0, 2.0)


def backoff(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Return the wait after failed attempt n: exponential, capped, with equal jitter."""
    rng = rng or random.Random()
    ceiling = min(cap, base * 2 ** (attempt - 1))
    return float(ceiling / 2 + rng.uniform(0, ceiling / 2))


def deferral(retry_after: float, timeout: float, rng: random.Random | None = None) -> float:
    """Return the countdown of a charge refused by its breaker: retry_after plus a spread."""
    rng = rng or random.Random()
    return max(0.0, retry_after) + rng.uniform(0, deferral_spread(timeout))


def deferral_spread(timeout: float) -> float:
    """Return the most a deferral of a breaker with this timeout adds to its retry_after."""
    return min(DEFERRAL_SPREAD_MAX, max(MIN_SPREAD, timeout * DEFERRAL_SPREAD))
