"""The breaker state in the one shape every reader shows it (CONTRACT.md section 5).

The beat task publishes it, `breaker status --json` prints it, the exporter's /health wraps it.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from breaker import BreakerRegistry

# What a store that cannot answer raises: RedisClusterException (no node answers) is not a
# RedisError.
STORE_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)


class StoreUnavailable(Exception):
    """The breaker store cannot be reached, so no breaker can be read."""


def read_state(registry: BreakerRegistry) -> dict[str, Any]:
    """Return the publisher's message for every known breaker, or raise StoreUnavailable."""
    try:
        breakers = registry.snapshots()
    except STORE_ERRORS as exc:
        raise StoreUnavailable(one_line(exc)) from exc
    # A breaker whose store stops answering mid-read falls back to a per-process circuit
    # that knows nothing of the others: reporting it would pass a guess off as the truth.
    if any(snapshot.get("store") == "fallback" for snapshot in breakers):
        raise StoreUnavailable("the store stopped answering while the breakers were read")
    return {"published_at": round(time.time(), 3), "breakers": breakers}


def one_line(exc: BaseException) -> str:
    """Return an exception's message on a single line."""
    return " ".join(str(exc).split()) or type(exc).__name__
