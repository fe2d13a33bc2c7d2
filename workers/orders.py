"""Per-order bookkeeping in Redis: an order's first succeeded result, and who is charging it.

Keys (one cluster hash slot per order):
  payments:order:{<order_id>}:result  JSON of the first succeeded result; TTL payment_result_ttl
  payments:order:{<order_id>}:lock    who is charging the order now (task id:retry count);
                                      TTL one provider call
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

# KEYS[1] result, KEYS[2] lock; ARGV[1] holder, ARGV[2] lock TTL (ms).
# Reply: {"done", result} if the order already succeeded; {"busy", ms left} if another task
# holds the lock; {"go", 0} once the caller holds it (a redelivered message takes its own back).
BEGIN = """
local done = redis.call('GET', KEYS[1])
if done then return {'done', done} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'busy', redis.call('PTTL', KEYS[2])} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {'go', 0}
"""

# KEYS[1] result, KEYS[2] lock; ARGV[1] holder, ARGV[2] result JSON or '', ARGV[3] TTL (ms).
# Keeps the first result ever stored; frees the lock if the caller still holds it.
# Reply: the stored result ('' if none).
FINISH = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return redis.call('GET', KEYS[1]) or ''
"""


@dataclass(frozen=True)
class Begin:
    """What the order book said when a task asked to charge an order."""

    result: dict[str, Any] | None = None
    busy_for: float = 0.0

    @property
    def may_charge(self) -> bool:
        """Return True if the caller holds the order and no charge succeeded yet."""
        return self.result is None and not self.busy_for


class OrderBook:
    """The first succeeded result of each order, and a lock so one message charges it at a time."""

    def __init__(self, client: redis.Redis, result_ttl: float, lock_ttl: float) -> None:
        self._client = client
        self._result_ttl_ms = int(result_ttl * 1000)
        self._lock_ttl_ms = int(lock_ttl * 1000)
        self._begin = client.register_script(BEGIN)
        self._finish = client.register_script(FINISH)

    @staticmethod
    def keys(order_id: str) -> list[str]:
        """Return the result and lock keys of an order."""
        base = f"payments:order:{{{order_id}}}"
        return [f"{base}:result", f"{base}:lock"]

    def begin(self, order_id: str, holder: str) -> Begin:
        """Take the order for holder unless it already succeeded or someone else has it."""
        kind, value = self._begin(keys=self.keys(order_id), args=[holder, self._lock_ttl_ms])
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "done":
            return Begin(result=json.loads(value))
        if kind == "busy":
            return Begin(busy_for=max(int(value), 1) / 1000)
        return Begin()

    def finish(
        self, order_id: str, holder: str, result: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Store a succeeded result (the first one wins), free the lock; return the stored one."""
        stored = self._finish(
            keys=self.keys(order_id),
            args=[holder, json.dumps(result) if result else "", self._result_ttl_ms],
        )
        return json.loads(stored) if stored else None

    def result(self, order_id: str) -> dict[str, Any] | None:
        """Return the order's first succeeded result, if any."""
        stored = self._client.get(self.keys(order_id)[0])
        return json.loads(stored) if stored else None
