"""The order book: per order, its first succeeded result, who charges it now, and a journal
of every provider attempt, so no order is charged twice and no attempt is forgotten.

Keys, one Redis Cluster hash slot per order (docs/design.md, "The order book"):
  payments:order:{<order_id>}       hash: result, journal (fields below); TTL result_ttl
  payments:order:{<order_id>}:lock  "<holder> <fence>": the message charging the order now
  payments:conflicts                count of second charges seen for one order (all orders)
  payments:conflicts:orders         sorted set: orders with a second charge, by when seen

Fields of the order hash:
  result          JSON of the first succeeded result
  fence           bumped each time a message takes the lock; a holder whose fence moved on
                  may no longer start an attempt
  rcv:<task id>   when a worker first received that task (unix s): its deadline's start
  att:<task id>   provider calls that task has made
  pending         Idempotency-Key of the attempt whose outcome is unknown, if any
  a:<key>         JSON of the attempt made with that key: status (unsettled, unknown,
                  succeeded, declined, rejected, not_reached), task, at, calls, charge_id,
                  and while unsettled the request, so any task can replay it
  conflicts       JSON list of second charges: charge_id, first_charge_id, task, at

Every operation is one Lua script, run atomically on the server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import redis

from workers.validation import ChargeRequest

CONFLICTS_KEY = "payments:conflicts"
CONFLICT_ORDERS_KEY = "payments:conflicts:orders"

# Statuses of a journaled attempt.
UNSETTLED = "unsettled"  # sent, or about to be: no answer yet
UNKNOWN = "unknown"  # no answer came, and the request may have been processed
SETTLED = ("succeeded", "declined", "rejected", "not_reached")

# KEYS[1] order hash; ARGV[1] task id, ARGV[2] now (unix s), ARGV[3] hash TTL (ms).
# Reply: when a worker first received the task (unix s), recorded now if this is the first.
RECEIVE = """
local field = 'rcv:' .. ARGV[1]
local first = redis.call('HGET', KEYS[1], field)
if first then return first end
redis.call('HSET', KEYS[1], field, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return ARGV[2]
"""

# Journal an attempt with key (ATTEMPT, and BEGIN when asked): mark it unsettled and pending,
# with its request, task and time; return the provider calls made by that task so far.
JOURNAL = """
local function journal(H, key, task, now, request)
  local field = 'a:' .. key
  local raw = redis.call('HGET', H, field)
  local attempt = {calls = 0}
  if raw then attempt = cjson.decode(raw) end
  attempt.status = 'unsettled'
  attempt.task = task
  attempt.at = tonumber(now)
  attempt.calls = (attempt.calls or 0) + 1
  attempt.request = cjson.decode(request)
  redis.call('HSET', H, 'pending', key, field, cjson.encode(attempt))
  return redis.call('HINCRBY', H, 'att:' .. task, 1)
end
"""

# KEYS[1] order hash, KEYS[2] lock; ARGV[1] holder, ARGV[2] lock TTL (ms), ARGV[3] task id,
# ARGV[4] now (unix s), ARGV[5] hash TTL (ms), ARGV[6] the caller's Idempotency-Key,
# ARGV[7] the request JSON of an attempt to journal at once if the caller may make it, or ''.
# Reply, first receipt second:
#   {'done', received, result, conflicts, status of the caller's key's attempt or ''}
#                                                the order already succeeded
#   {'busy', received, lock ms left}             another message holds the order
#   {'go', received, fence, calls, pending key, pending attempt, calls after journaling
#    the attempt or 0}                           the caller holds it
# A redelivered message takes its own lock back, under a new fence. The attempt is journaled
# (as ATTEMPT would, the lock just taken) unless another key's attempt is pending.
BEGIN = JOURNAL + """
local H, L = KEYS[1], KEYS[2]
local rcv_field = 'rcv:' .. ARGV[3]
local rcv = redis.call('HGET', H, rcv_field)
local result = redis.call('HGET', H, 'result')
if result then
  local own = redis.call('HGET', H, 'a:' .. ARGV[6])
  return {'done', rcv or ARGV[4], result, redis.call('HGET', H, 'conflicts') or '',
          own and cjson.decode(own).status or ''}
end
if not rcv then
  rcv = ARGV[4]
  redis.call('HSET', H, rcv_field, rcv)
end
redis.call('PEXPIRE', H, ARGV[5])
local lock = redis.call('GET', L)
if lock and string.match(lock, '^(%S+)') ~= ARGV[1] then
  return {'busy', rcv, math.max(redis.call('PTTL', L), 1)}
end
local fence = redis.call('HINCRBY', H, 'fence', 1)
redis.call('SET', L, ARGV[1] .. ' ' .. fence, 'PX', ARGV[2])
local pending = redis.call('HGET', H, 'pending')
local attempt = ''
if pending then attempt = redis.call('HGET', H, 'a:' .. pending) or '' end
local calls = tonumber(redis.call('HGET', H, 'att:' .. ARGV[3]) or 0)
local journaled = 0
if ARGV[7] ~= '' and (not pending or pending == ARGV[6]) then
  journaled = journal(H, ARGV[6], ARGV[3], ARGV[4], ARGV[7])
end
return {'go', rcv, fence, calls, pending or '', attempt, journaled}
"""

# KEYS[1] order hash, KEYS[2] lock; ARGV[1] holder, ARGV[2] fence, ARGV[3] Idempotency-Key,
# ARGV[4] request JSON, ARGV[5] task id, ARGV[6] now (unix s), ARGV[7] lock TTL (ms),
# ARGV[8] hash TTL (ms).
# Journal an attempt before the provider call, and renew the lock for that call.
# Reply: {'go', calls by this task} | {'stale'} (the fence moved on: another message took
# the order) | {'done', result} | {'pending', key} (another key's outcome is still unknown).
ATTEMPT = JOURNAL + """
local H, L = KEYS[1], KEYS[2]
local mine = ARGV[1] .. ' ' .. ARGV[2]
local lock = redis.call('GET', L)
if lock ~= mine then
  -- A lock that ran out with nobody taking it since (same fence) may be taken back.
  if lock or redis.call('HGET', H, 'fence') ~= ARGV[2] then return {'stale'} end
end
local result = redis.call('HGET', H, 'result')
if result then return {'done', result} end
local pending = redis.call('HGET', H, 'pending')
if pending and pending ~= ARGV[3] then return {'pending', pending} end
local calls = journal(H, ARGV[3], ARGV[5], ARGV[6], ARGV[4])
redis.call('SET', L, mine, 'PX', ARGV[7])
redis.call('PEXPIRE', H, ARGV[8])
return {'go', calls}
"""

# KEYS[1] order hash, KEYS[2] lock; ARGV[1] holder, ARGV[2] fence, ARGV[3] Idempotency-Key,
# ARGV[4] outcome (succeeded, declined, rejected, not_reached, unknown), ARGV[5] charge id
# or '', ARGV[6] result JSON or '', ARGV[7] now (unix s), ARGV[8] hash TTL (ms),
# ARGV[9] '1' to free the lock if the caller still holds it.
# Records the outcome whoever holds the lock now: money that moved is never dropped. The
# first succeeded result is kept; a success with another charge id is a conflict.
# Reply: {stored result or '', 'new' if this call found a new conflict else '', conflicts,
#         the attempt's status now}.
SETTLE = """
local H, L = KEYS[1], KEYS[2]
-- A write Redis allows over maxmemory, first: after it, so are the others. An outcome
-- the provider gave must be kept even when the order book's Redis is full.
redis.call('PEXPIRE', H, ARGV[8])
local field = 'a:' .. ARGV[3]
local raw = redis.call('HGET', H, field)
local attempt = {calls = 0}
if raw then attempt = cjson.decode(raw) end
local outcome = ARGV[4]
-- "Not reached" speaks for this call only: an earlier call with the same key may have
-- been processed, and only an answer from the provider settles that.
if outcome == 'not_reached' and attempt.reached then outcome = 'unknown' end
if outcome == 'unknown' then attempt.reached = true end
attempt.status = outcome
if outcome ~= 'unknown' then
  attempt.request = nil
  attempt.settled_at = tonumber(ARGV[7])
  if redis.call('HGET', H, 'pending') == ARGV[3] then redis.call('HDEL', H, 'pending') end
end
if ARGV[5] ~= '' then attempt.charge_id = ARGV[5] end
local stored = redis.call('HGET', H, 'result')
local conflict = ''
if outcome == 'succeeded' then
  if not stored then
    stored = ARGV[6]
    redis.call('HSET', H, 'result', stored)
  elseif cjson.decode(stored).charge_id ~= ARGV[5] then
    local conflicts = cjson.decode(redis.call('HGET', H, 'conflicts') or '[]')
    local known = false
    for _, c in ipairs(conflicts) do
      if c.charge_id == ARGV[5] then known = true end
    end
    if not known then
      table.insert(conflicts, {charge_id = ARGV[5],
                               first_charge_id = cjson.decode(stored).charge_id,
                               task = attempt.task or '', at = tonumber(ARGV[7])})
      redis.call('HSET', H, 'conflicts', cjson.encode(conflicts))
      conflict = 'new'
    end
  end
end
redis.call('HSET', H, field, cjson.encode(attempt))
if ARGV[9] == '1' and redis.call('GET', L) == ARGV[1] .. ' ' .. ARGV[2] then
  redis.call('DEL', L)
end
return {stored or '', conflict, redis.call('HGET', H, 'conflicts') or '', outcome}
"""

# KEYS[1] lock; ARGV[1] "<holder> <fence>". Frees the lock if the caller still holds it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class NotReplicated(redis.RedisError):
    """A journal write no replica acknowledged in time: a failover could lose it."""


@dataclass(frozen=True)
class PendingAttempt:
    """An attempt whose outcome is unknown: replay its key before charging under another."""

    key: str
    task: str
    request: ChargeRequest


@dataclass(frozen=True)
class Begin:
    """What the order book said when a message asked to charge an order."""

    first_received: float
    result: dict[str, Any] | None = None
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    # With a result: what the journal knows of the caller's own key ('' if nothing).
    own_status: str = ""
    busy_for: float = 0.0
    fence: int = 0
    calls: int = 0
    pending: PendingAttempt | None = None
    # The caller's attempt, journaled with the lock (begin(attempt=...)): the calls by its
    # task after it; 0 if it was not journaled.
    journaled_calls: int = 0

    @property
    def holds(self) -> bool:
        """Return True if the caller now holds the order."""
        return self.fence > 0


@dataclass(frozen=True)
class Journaled:
    """What the order book said to an attempt about to be made."""

    kind: str  # go, stale, done, pending
    calls: int = 0
    result: dict[str, Any] | None = None


@dataclass(frozen=True)
class Settled:
    """The order after an outcome was recorded."""

    result: dict[str, Any] | None
    new_conflict: bool
    conflicts: list[dict[str, Any]]
    # The attempt's status now: "unknown" while a call with its key may have been processed.
    status: str


class OrderBook:
    """Per-order results, locks and attempt journal in Redis (see the module docstring).

    With replicas > 0, the two writes money depends on (an attempt before its call, an
    outcome after it) return only once that many replicas have them (WAIT), and raise
    NotReplicated otherwise: with asynchronous replication a failover loses the last writes.
    """

    def __init__(
        self,
        client: Any,
        result_ttl: float,
        lock_ttl: float,
        replicas: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        self._client = client
        self._ttl_ms = int(result_ttl * 1000)
        self.lock_ttl = lock_ttl
        self._lock_ttl_ms = int(lock_ttl * 1000)
        self.replicas = replicas
        self._replica_timeout_ms = int(replica_timeout * 1000)
        self._receive = client.register_script(RECEIVE)
        self._begin = client.register_script(BEGIN)
        self._attempt = client.register_script(ATTEMPT)
        self._settle = client.register_script(SETTLE)
        self._release = client.register_script(RELEASE)

    @staticmethod
    def keys(order_id: str) -> list[str]:
        """Return the order hash and lock keys of an order."""
        base = f"payments:order:{{{order_id}}}"
        return [base, f"{base}:lock"]

    def received(self, order_id: str, task_id: str, now: float) -> float:
        """Return when task_id was first received, recording now if this is the first time."""
        first = self._receive(keys=self.keys(order_id)[:1], args=[task_id, now, self._ttl_ms])
        return float(_text(first))

    def begin(
        self, order_id: str, holder: str, task_id: str, key: str, now: float,
        attempt: ChargeRequest | None = None,
    ) -> Begin:
        """Take the order for holder unless it already succeeded or another message has it.

        attempt: the request holder means to send with key; journaled with the lock (one
        round trip instead of begin and attempt) unless another key's attempt is pending.
        """
        args = [holder, self._lock_ttl_ms, task_id, now, self._ttl_ms, key, ""]
        if attempt is None:
            reply = self._begin(keys=self.keys(order_id), args=args)
        else:
            args[-1] = json.dumps(_attempt_body(attempt, key))
            reply = self._durably(self._begin, self.keys(order_id), args)
        kind, received = _text(reply[0]), float(_text(reply[1]))
        if kind == "done":
            return Begin(
                received,
                result=json.loads(reply[2]),
                conflicts=_list(reply[3]),
                own_status=_text(reply[4]),
            )
        if kind == "busy":
            return Begin(received, busy_for=int(reply[2]) / 1000)
        pending = None
        if reply[4]:
            earlier = json.loads(reply[5]) if reply[5] else {}
            request = earlier.get("request")
            if isinstance(request, dict):
                pending = PendingAttempt(
                    _text(reply[4]), str(earlier.get("task", "")), ChargeRequest(**request)
                )
        return Begin(
            received, fence=int(reply[2]), calls=int(reply[3]), pending=pending,
            journaled_calls=int(reply[6]),
        )

    def attempt(
        self,
        order_id: str,
        holder: str,
        fence: int,
        key: str,
        request: ChargeRequest,
        task_id: str,
        now: float,
    ) -> Journaled:
        """Journal an attempt with key before it is sent, renewing the lock for the call."""
        body = json.dumps(_attempt_body(request, key))
        reply = self._durably(
            self._attempt,
            self.keys(order_id),
            [holder, fence, key, body, task_id, now, self._lock_ttl_ms, self._ttl_ms],
        )
        kind = _text(reply[0])
        if kind == "go":
            return Journaled("go", calls=int(reply[1]))
        if kind == "done":
            return Journaled("done", result=json.loads(reply[1]))
        return Journaled(kind)

    def settle(
        self,
        order_id: str,
        holder: str,
        fence: int,
        key: str,
        outcome: str,
        now: float,
        *,
        charge_id: str | None = None,
        result: dict[str, Any] | None = None,
        release: bool = True,
    ) -> Settled:
        """Record how the attempt made with key ended; free the lock if asked and still ours."""
        stored, conflict, conflicts, status = self._durably(
            self._settle,
            self.keys(order_id),
            [holder, fence, key, outcome, charge_id or "", json.dumps(result) if result else "",
             now, self._ttl_ms, "1" if release else "0"],
        )
        return Settled(
            json.loads(stored) if stored else None,
            _text(conflict) == "new",
            _list(conflicts),
            _text(status),
        )

    def _durably(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run script; with replicas, on the same connection as a WAIT for them."""
        if not self.replicas:
            return script(keys=keys, args=args)
        # WAIT counts the writes of its own connection: one pipeline, one connection.
        pipe = self._client.pipeline(transaction=False)
        script(keys=keys, args=args, client=pipe)
        pipe.wait(self.replicas, self._replica_timeout_ms)
        reply, acknowledged = pipe.execute()
        if int(acknowledged) < self.replicas:
            raise NotReplicated(
                f"{acknowledged} of {self.replicas} replica(s) acknowledged the journal write "
                f"within {self._replica_timeout_ms} ms"
            )
        return reply

    def release(self, order_id: str, holder: str, fence: int) -> None:
        """Free the order's lock if holder still holds it under fence."""
        self._release(keys=self.keys(order_id)[1:], args=[f"{holder} {fence}"])

    def count_conflict(self, order_id: str, now: float) -> None:
        """Count a second charge for order_id where the exporter and operators see it."""
        # Two commands, not a script: these keys live in a slot of their own.
        self._client.incr(CONFLICTS_KEY)
        self._client.zadd(CONFLICT_ORDERS_KEY, {order_id: now})

    def conflicts_total(self) -> int:
        """Return how many second charges for one order were ever seen."""
        return int(self._client.get(CONFLICTS_KEY) or 0)

    def journal(self, order_id: str) -> dict[str, Any]:
        """Return the order's hash decoded: result, attempts by key, receipts, conflicts."""
        raw = {_text(k): _text(v) for k, v in self._client.hgetall(self.keys(order_id)[0]).items()}
        out: dict[str, Any] = {"attempts": {}, "received": {}, "calls": {}}
        for name, value in raw.items():
            if name.startswith("a:"):
                out["attempts"][name[2:]] = json.loads(value)
            elif name.startswith("rcv:"):
                out["received"][name[4:]] = float(value)
            elif name.startswith("att:"):
                out["calls"][name[4:]] = int(value)
            elif name in ("result", "conflicts"):
                out[name] = json.loads(value)
            else:
                out[name] = value
        return out

    def result(self, order_id: str) -> dict[str, Any] | None:
        """Return the order's first succeeded result, if any."""
        stored = self._client.hget(self.keys(order_id)[0], "result")
        return json.loads(stored) if stored else None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _list(value: Any) -> list[dict[str, Any]]:
    text = _text(value) if value else ""
    loaded = json.loads(text) if text else []
    return loaded if isinstance(loaded, list) else []


def _attempt_body(request: ChargeRequest, key: str) -> dict[str, Any]:
    """Return what the journal keeps of an attempt's request: enough to replay it."""
    return {
        "order_id": request.order_id,
        "amount": request.amount,
        "currency": request.currency,
        "payment_token": request.payment_token,
        "payment_method": request.payment_method,
        "idempotency_key": key,
    }
