"""The breaker state in the one shape every reader shows it (CONTRACT.md section 5).

The beat task publishes it, `breaker status --json` prints it, the exporter's /health wraps it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from breaker import BreakerRegistry
from breaker.redis_core import STORE_ERRORS

__all__ = ["STORE_ERRORS", "StoreUnavailable", "one_line", "read_state", "summary"]


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
    now = time.time()
    # The summary first: Flower shows a result's first keys in its list, nested ones cut.
    return {"summary": summary(breakers, now), "published_at": round(now, 3),
            "breakers": breakers}


def summary(breakers: list[dict[str, Any]], now: float) -> str:
    """Return the breakers' states in one line an operator reads at a glance."""
    if not breakers:
        return "no breaker used yet"
    parts = []
    for b in breakers:
        state = b["state"]
        if state == "closed":
            parts.append(f"{b['name']} closed")
            continue
        text = f"{b['name']} {state.upper()}"
        if b.get("opened_at"):
            since = datetime.fromtimestamp(b["opened_at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            text += f" since {since} ({_duration(now - b['opened_at'])}"
            text += f", {b['open_cause']})" if b.get("open_cause") else ")"
        if state == "open":
            text += f", next probe in {_duration(b['retry_after'])}"
        parts.append(text)
    # The breakers that refuse calls first: they are what an operator looks for.
    parts.sort(key=lambda part: part.endswith(" closed"))
    return " · ".join(parts)


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def one_line(exc: BaseException) -> str:
    """Return an exception's message on a single line."""
    return " ".join(str(exc).split()) or type(exc).__name__
