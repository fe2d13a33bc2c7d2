"""What the demo reads while the sale runs: charge results, and the breaker's state in time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery

from breaker import BreakerRegistry, RedisStore
from workers.config import Settings
from workers.runtime import breaker_client


@dataclass(frozen=True)
class Tally:
    """Where the charges of the sale are, by their Celery result state."""

    total: int
    charged: int = 0
    declined: int = 0
    failed: int = 0
    deferred: int = 0  # RETRY: parked until the breaker lets it through, or backing off
    running: int = 0
    queued: int = 0
    to_come: int = 0  # orders of the sale not sent yet

    @property
    def finished(self) -> int:
        """Return how many charges have a final result."""
        return self.charged + self.declined + self.failed

    @property
    def settled(self) -> bool:
        """Return True once every charge has a final result."""
        return self.finished >= self.total


class ResultReader:
    """Read the sale's task results from the result backend, all of them in one round trip."""

    def __init__(self, redis_url: str) -> None:
        # An app of its own: a sending app with a Redis backend would subscribe to every task.
        self.app = Celery("flash-sale-results", backend=redis_url, set_as_current=False)
        self.app.conf.update(result_serializer="json", result_accept_content=["json"])

    def read(self, task_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Return each task's result meta (status, result, date_done), None while it has none."""
        if not task_ids:
            return []
        backend = self.app.backend
        values = backend.mget([backend.get_key_for_task(task_id) for task_id in task_ids])
        return [backend.decode(value) if value else None for value in values]

    def close(self) -> None:
        """Close the backend's connections."""
        self.app.close()


def tally(metas: Sequence[dict[str, Any] | None]) -> Tally:
    """Return how many charges are in each state."""
    states = Counter(meta["status"] if meta else "PENDING" for meta in metas)
    declined = sum(
        1 for meta in metas
        if meta and meta["status"] == "SUCCESS" and _result_status(meta) == "declined"
    )
    return Tally(
        total=len(metas),
        charged=states["SUCCESS"] - declined,
        declined=declined,
        failed=states["FAILURE"] + states["REVOKED"],
        deferred=states["RETRY"],
        running=states["STARTED"],
        queued=states["PENDING"] + states["RECEIVED"],
    )


def _result_status(meta: dict[str, Any]) -> Any:
    result = meta.get("result")
    return result.get("status") if isinstance(result, dict) else None


class BreakerWatch:
    """Follow one breaker in the shared store, and date every state it went through.

    Sampling alone would miss a half-open period shorter than the sampling interval, so the
    store's transition counters say which states were passed between two samples, and its
    opened_at (server clock) dates the last opening exactly; half-open begins a timeout later.
    """

    def __init__(self, settings: Settings, name: str, started_at: float) -> None:
        self.name = name
        self.client = breaker_client(settings)
        self.registry = BreakerRegistry(
            RedisStore(self.client),
            defaults=settings.breaker_defaults,
            overrides=settings.breaker_overrides,
        )
        self.timeout = self.registry.config_for(name).timeout_seconds
        self.snapshot: dict[str, Any] | None = None
        # A breaker is closed until its first failure, whether or not a worker has built it.
        self.changes: list[tuple[float, str]] = [(started_at, "closed")]
        self._seen_at = started_at
        self._transitions: dict[str, int] = {}
        self._opened_at = started_at
        self._known = False

    @property
    def state(self) -> str:
        """Return the state last seen."""
        return self.changes[-1][1]

    def sample(self, now: float) -> dict[str, Any] | None:
        """Read the breaker's snapshot now and date the states it passed since the last one."""
        if not self._known:
            self._known = self.registry.known(self.name)
            if not self._known:
                self._seen_at = now
                return None
        snapshot = self.registry.get(self.name).snapshot()
        self._follow(now, snapshot)
        self.snapshot = snapshot
        self._seen_at = now
        return snapshot

    def _follow(self, now: float, snapshot: dict[str, Any]) -> None:
        counts: dict[str, int] = snapshot["transitions"]
        moved = Counter(
            {edge: n - self._transitions.get(edge, 0)
             for edge, n in counts.items() if n > self._transitions.get(edge, 0)}
        )
        self._transitions = dict(counts)
        path = _walk(self.state, snapshot["state"], moved)
        if path is None:
            path = [snapshot["state"]] if snapshot["state"] != self.state else []
        if not path:
            return
        last_open = max((i for i, s in enumerate(path) if s == "open"), default=None)
        previous, t = self.state, self._seen_at
        for i, state in enumerate(path):
            # Undated changes are spread evenly between the two samples.
            at = self._seen_at + (i + 1) * (now - self._seen_at) / (len(path) + 1)
            if state == "open" and i == last_open and snapshot["opened_at"]:
                at = float(snapshot["opened_at"])
            elif state == "half_open" and previous == "open":
                at = self._opened_at + self.timeout
            t = min(max(at, t), now)
            if state == "open":
                self._opened_at = t
            self.changes.append((t, state))
            previous = state

    def close(self) -> None:
        """Close the connection."""
        self.client.close()


def _walk(start: str, end: str, moved: Counter[str]) -> list[str] | None:
    """Return the states entered, in order, taking every transition in moved once from start
    and ending at end; None if no such order exists."""
    if sum(moved.values()) == 0:
        return [] if start == end else None
    for edge, n in moved.items():
        source, _, target = edge.partition("->")
        if source == start and n > 0:
            rest = moved.copy()
            rest[edge] -= 1
            tail = _walk(target, end, rest)
            if tail is not None:
                return [target, *tail]
    return None


def segments(changes: Sequence[tuple[float, str]], end: float) -> list[tuple[float, float, str]]:
    """Return (start, end, state) spans from dated state changes up to end."""
    spans = []
    for (start, state), (stop, _) in zip(changes, [*changes[1:], (end, "")], strict=True):
        if stop > start:
            spans.append((start, stop, state))
    return spans
