"""What RedisStore and AsyncRedisStore share, without I/O: the scripts, what a process knows
of one circuit (the server's last answer, the counts it has not sent yet), and store health.

The two stores differ only in how they send a command (blocking or awaited); every decision
about when to send one, what it carries and what its reply means is made here.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis

from breaker.memory import MemoryStore
from breaker.state import BreakerConfig, CircuitBreakerOpenError, CircuitState, Outcome
from breaker.store import (
    OPEN_CAUSES,
    PolicyView,
    StateView,
    Ticket,
    TransitionHook,
    build_snapshot,
)
from breaker.window import WindowCounts, bucket_ms

log = logging.getLogger("breaker")

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
SUCCESS = Outcome.SUCCESS

OPERATIONS = ("admit", "record", "flush", "reset", "force_open", "read")

# How long a process refuses calls on its own while all probe slots are taken, before it
# asks Redis again: a refused caller still gets the server's retry_after.
HALF_OPEN_LOCAL_REFUSAL_SECONDS = 0.05

# Tickets handed out by the per-process fallback carry their generation negated; Redis
# generations are server timestamps in milliseconds, always positive.

TOTALS = ("successes", "failures", "rejected", "half_open_successes", "half_open_failures")


def _load_scripts() -> dict[str, str]:
    folder = resources.files("breaker") / "lua"
    common = (folder / "common.lua").read_text()
    return {op: common + "\n" + (folder / f"{op}.lua").read_text() for op in OPERATIONS}


SCRIPTS = _load_scripts()

# Server conditions, as Redis 6.2 (wrapped in "Error running script ...") and 7.x (as the
# reply's own code) report them from inside a script: store trouble, not a script bug.
_STORE_TROUBLE = re.compile(
    r"\b(OOM|NOPERM|BUSY|LOADING|MISCONF|READONLY|NOREPLICAS|MASTERDOWN|CLUSTERDOWN|TRYAGAIN"
    r"|WRONGTYPE|NOAUTH)\b|can't run this command|Script killed"
)
_SCRIPT_FAILED = ("user_script", "Error running script")

# What a store that cannot answer raises: any Redis error, and RedisClusterException (no
# cluster node answers, or none owns a slot), which is not a RedisError.
STORE_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
# The store trouble a warning calls "unreachable" rather than "failing".
UNREACHABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.RedisClusterException,
)


def is_script_bug(exc: Exception) -> bool:
    """Return True if exc says a script (or the arguments it was given) is wrong.

    Everything else Redis can answer (out of memory, no permission, busy, loading, a
    read-only replica, a key of the wrong type, a lost connection) is store trouble: the
    breaker carries on from its fallback. A bug is a Lua runtime error or the client's own
    refusal of an argument (DataError); it is logged at ERROR so that the tests fail on it.
    """
    if isinstance(exc, redis.DataError):
        return True
    if type(exc) is not redis.ResponseError:
        return False
    text = str(exc)
    return any(marker in text for marker in _SCRIPT_FAILED) and not _STORE_TROUBLE.search(text)


class StoreHealth:
    """Whether a store uses Redis now or its fallback; one warning per outage."""

    def __init__(self, reconnect_interval: float) -> None:
        self.reconnect_interval = reconnect_interval
        self.degraded = False
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._bugs_logged: set[str] = set()

    def use_redis(self) -> bool:
        """Return whether to try Redis now: always when healthy, once per interval if not."""
        if not self.degraded:
            return True
        return time.monotonic() >= self._retry_at

    def failed(self, exc: Exception, op: str) -> None:
        """Judge a command that failed: a script bug is logged, store trouble degrades."""
        if is_script_bug(exc):
            self._script_bug(exc, op)
            return
        with self._lock:
            self._retry_at = time.monotonic() + self.reconnect_interval
            if self.degraded:
                return
            self.degraded = True
        unreachable = isinstance(exc, UNREACHABLE)
        log.warning(
            "Circuit breaker store %s (%s: %s); breakers run on a per-process fallback until "
            "Redis answers again",
            "unreachable" if unreachable else "failing", type(exc).__name__, exc,
        )

    def succeeded(self) -> None:
        """Note a command that worked: the end of an outage, if there was one."""
        if not self.degraded:
            return
        with self._lock:
            if not self.degraded:
                return
            self.degraded = False
        log.warning("Circuit breaker store reachable again; breakers share Redis state")

    def _script_bug(self, exc: Exception, op: str) -> None:
        with self._lock:
            if op in self._bugs_logged:
                return
            self._bugs_logged.add(op)
        log.error(
            "Circuit breaker script %r failed (%s: %s); this call used the per-process "
            "fallback. This is a bug in the breaker, not store trouble.",
            op, type(exc).__name__, exc, exc_info=exc, extra={"breaker_script_error": True},
        )


# The client options RedisStore.from_url and AsyncRedisStore.from_url pass to the client.
CLIENT_OPTIONS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")


class StoreBase:
    """What RedisStore and AsyncRedisStore share: settings, key layout, health, lease ids."""

    kind = "redis"

    def _configure(
        self,
        prefix: str,
        key_ttl_seconds: float,
        staleness_seconds: float,
        reconnect_interval: float,
    ) -> None:
        """Check and keep the store's settings; raise ValueError naming a bad one."""
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        for field, value in (
            ("key_ttl_seconds", key_ttl_seconds),
            ("staleness_seconds", staleness_seconds),
            ("reconnect_interval", reconnect_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{field} must be a number of seconds >= 0, got {value!r}")
        if key_ttl_seconds < 1:
            raise ValueError(f"key_ttl_seconds must be at least 1 second, got {key_ttl_seconds!r}")
        self.prefix = prefix
        self.index_key = f"{prefix}:index"
        self.ttl_ms = int(key_ttl_seconds * 1000)
        self.staleness = float(staleness_seconds)
        self.health = StoreHealth(float(reconnect_interval))
        self.fallback = MemoryStore()
        self._lease_prefix = f"{os.getpid()}:{uuid.uuid4().hex[:8]}:"
        self._lease_seq = 0
        self._lease_lock = threading.Lock()

    @staticmethod
    def client_options(kwargs: dict[str, Any]) -> dict[str, Any]:
        """Take the client's own options out of from_url's keyword arguments."""
        return {key: kwargs.pop(key) for key in CLIENT_OPTIONS if key in kwargs}

    def keys(self, name: str) -> list[str]:
        """Return the circuit hash and probe lease keys of name, in one cluster hash slot."""
        base = f"{self.prefix}:{{{name}}}"
        return [base, f"{base}:probes"]

    def window_key(self, name: str) -> str:
        """Return the key of name's outcome window (the rate rules), in the same slot."""
        return f"{self.prefix}:{{{name}}}:window"

    def next_lease(self) -> str:
        """Return a probe lease id unique across processes."""
        with self._lease_lock:
            self._lease_seq += 1
            return f"{self._lease_prefix}{self._lease_seq}"

    @property
    def degraded(self) -> bool:
        """Return True while Redis cannot be used and circuits run on the fallback."""
        return self.health.degraded


class RedisCircuitCore:
    """One circuit in Redis as seen with one breaker's settings: the decisions, no I/O.

    A process acts on what the server last told it for at most staleness seconds. While
    that says CLOSED with no failure counted, it admits without asking and batches the
    successes (they change nothing but the totals); every command it sends carries the
    batch, and a flush sends it at the latest staleness seconds after its first count.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        keys: list[str],
        ttl_ms: int,
        staleness: float,
        on_transition: TransitionHook,
        schedule_flush: Callable[[float], None],
    ) -> None:
        self.name = name
        self.config = config
        self.keys = keys
        self.staleness = staleness
        self._notify = on_transition
        # Called with a time.monotonic deadline when a batch starts: flush it by then.
        self._schedule_flush = schedule_flush
        self.clock: Callable[[], float] = time.monotonic
        self.argv_head: list[Any] = [
            config.failure_threshold,
            _ms(config.timeout_seconds),
            config.success_threshold,
            config.half_open_max_calls,
            _ms(config.lease_seconds),
            ttl_ms,
            repr(config.open_backoff),
            _ms(config.max_open_seconds),
            repr(config.failure_rate_threshold or 0.0),
            repr(config.slow_rate or 0.0),
            bucket_ms(config.window_seconds),
            config.minimum_calls,
        ]
        self._lock = threading.Lock()
        # The batch: counts not sent yet, the generation its successes were made in, and
        # when its first count was made (time.monotonic; None while empty).
        self._batch_gen = 0
        self._batch_successes = 0
        self._batch_rejected = 0
        self._batch_since: float | None = None
        # What the server said: (state, generation, failure count, act on it until,
        # refuse locally until, retry_after ends at), times in time.monotonic. One tuple,
        # replaced whole, so a thread never reads one answer's state with another's generation.
        self.cache: tuple[CircuitState, int, int, float, float, float] = (
            CLOSED, 0, 0, 0.0, 0.0, 0.0
        )

    def admit_from_cache(self, now: float) -> Ticket | None:
        """Return a ticket, raise a refusal, or None when the server must be asked."""
        state, gen, fc, fresh_until, refuse_until, retry_at = self.cache
        if now >= fresh_until:
            return None
        if state is CLOSED and not fc:
            return (gen, None)
        if now < refuse_until:
            self._count_refusal(gen, now)
            raise CircuitBreakerOpenError(self.name, state, retry_at - now)
        return None

    def batch_success(self, gen: int) -> bool:
        """Count a success without a command if it changes nothing but the totals."""
        state, cached_gen, fc, fresh_until, _, _ = self.cache
        if state is not CLOSED or fc or gen != cached_gen:
            return False
        now = time.monotonic()
        if now >= fresh_until:
            return False
        with self._lock:
            if self._batch_successes and self._batch_gen != gen:
                return False
            started = self._batch_since is None
            if started:
                self._batch_since = now
            self._batch_gen = gen
            self._batch_successes += 1
        if started:
            self._schedule_flush(now + self.staleness)
        return True

    def _count_refusal(self, gen: int, now: float) -> None:
        with self._lock:
            started = self._batch_since is None
            if started:
                self._batch_since = now
            if not self._batch_successes:
                self._batch_gen = gen
            self._batch_rejected += 1
        if started:
            self._schedule_flush(now + self.staleness)

    def flush_deadline(self) -> float | None:
        """Return when the batch must be sent (time.monotonic), None if there is none."""
        since = self._batch_since
        return None if since is None else since + self.staleness

    def take_batch(self) -> tuple[int, int, int]:
        """Return (generation, successes, refusals) to send, and empty the batch."""
        with self._lock:
            batch = (self._batch_gen, self._batch_successes, self._batch_rejected)
            self._batch_successes = self._batch_rejected = 0
            self._batch_since = None
        return batch

    def restore_batch(self, batch: tuple[int, int, int]) -> None:
        """Put back counts whose command Redis refused, to go with a later one."""
        gen, successes, rejected = batch
        if not (successes or rejected):
            return
        with self._lock:
            if self._batch_since is None:
                self._batch_since = time.monotonic()
            self._batch_rejected += rejected
            if not successes:
                return
            if self._batch_successes and self._batch_gen != gen:
                # Successes of two generations cannot share a batch: those put back are
                # older, from before a transition; they are dropped (totals only).
                return
            self._batch_gen = gen
            self._batch_successes += successes

    def forget_batch(self) -> None:
        """Drop the batch (a forked child must not send its parent's counts again)."""
        self.take_batch()

    def args(self, batch: tuple[int, int, int], *op_args: Any) -> list[Any]:
        """Return the ARGV of one script: settings, the batch, the operation's own."""
        return [*self.argv_head, *batch, *op_args]

    @staticmethod
    def record_args(
        ticket: Ticket, outcome: Outcome, slow: bool, retry_after: float
    ) -> tuple[Any, ...]:
        """Return record.lua's own ARGV."""
        gen, lease = ticket
        return (gen, lease or "", int(outcome), int(slow), round(retry_after * 1000))

    def apply(self, reply: list[Any]) -> bool:
        """Cache what the server said and tell of the transitions this call made."""
        now = time.monotonic()
        status, state, gen, fc, _sc, retry_ms = reply[:6]
        circuit_state = CircuitState(_text(state))
        # retry_after is 0 whenever a call may be made, so it doubles as "refuse locally until".
        retry_after = max(0, int(retry_ms)) / 1000
        refuse_for = retry_after
        if circuit_state is HALF_OPEN:
            # Probes answer in milliseconds: refusing locally for the whole retry_after would
            # turn away every call of the next second although the circuit closed long since.
            refuse_for = min(retry_after, HALF_OPEN_LOCAL_REFUSAL_SECONDS)
        self.cache = (
            circuit_state,
            int(gen),
            int(fc),
            now + self.staleness,
            now + refuse_for,
            now + retry_after,
        )
        events = reply[6:]
        for i in range(0, len(events), 5):
            came_from, to, cause, count, open_ms = events[i : i + 5]
            self._notify(
                CircuitState(_text(came_from)), CircuitState(_text(to)), _text(cause),
                int(count), int(open_ms) / 1000,
            )
        return bool(status)

    def admitted(self, reply: list[Any], lease: str) -> Ticket:
        """Return the ticket an admit reply grants, or raise its refusal."""
        admitted = self.apply(reply)
        # From the reply, not the cache: another thread or a listener may have changed the
        # cache since, and the round trip must not lengthen the wait.
        state, gen, retry_ms = CircuitState(_text(reply[1])), int(reply[2]), int(reply[5])
        if admitted:
            return (gen, lease if state is HALF_OPEN else None)
        raise CircuitBreakerOpenError(self.name, state, max(0, retry_ms) / 1000)

    @staticmethod
    def view_from(reply: list[Any]) -> StateView:
        """Return the state in a read reply."""
        state, fc, sc, retry_ms = reply[:4]
        return StateView(CircuitState(_text(state)), int(retry_ms) / 1000, int(fc), int(sc))

    def snapshot_from(self, reply: list[Any]) -> dict[str, Any]:
        """Return the published snapshot of a read reply."""
        view = self.view_from(reply)
        opened_ms, open_ms = int(reply[4]), int(reply[6])
        window_calls, window_failures, window_slow = (int(v) for v in reply[7:10])
        fields = {_text(k): _text(v) for k, v in zip(reply[10::2], reply[11::2], strict=True)}
        totals = {key: int(fields.get(key, 0)) for key in TOTALS}
        transitions = {k[3:]: int(v) for k, v in fields.items() if k.startswith("tr:")}
        secs = {k[5:]: int(v) / 1000 for k, v in fields.items() if k.startswith("secs:")}
        openings = {cause: int(fields.get(f"opened:{cause}", 0)) for cause in OPEN_CAUSES}
        window = None
        if self.config.windowed:
            window = WindowCounts(window_calls, window_failures, window_slow)
        policy = PolicyView(
            open_duration=open_ms / 1000,
            reopens=int(fields.get("reopens", 0)),
            open_cause=fields.get("cause"),
            openings=openings,
            slow_calls=int(fields.get("slow_calls", 0)),
            window=window,
        )
        opened_at = round(opened_ms / 1000, 3) if opened_ms else None
        return build_snapshot(
            self.name, self.config, view, totals, transitions, secs, opened_at, "redis", policy
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
