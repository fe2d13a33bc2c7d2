"""RedisStore: one circuit per name shared by every process on a Redis, rules in Lua.

Every state change is one Lua script run atomically on the server with the server's
clock; docs/design.md shows the keys, the scripts and the states.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from importlib import resources
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from breaker.connection import client_from_url
from breaker.memory import MemoryStore
from breaker.state import BreakerConfig, CircuitBreakerOpenError, CircuitState, Outcome
from breaker.store import StateView, Ticket, TransitionHook, build_snapshot

log = logging.getLogger("breaker")

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

# Errors that mean "Redis cannot be reached right now", as opposed to a bug in a script.
# A Redis Cluster that lost a master answers CLUSTERDOWN (ClusterError), and when no node
# answers redis-py raises RedisClusterException ("cannot be connected"): neither is a
# ConnectionError.
UNREACHABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterError,
    redis.exceptions.RedisClusterException,
)

# Tickets handed out by the per-process fallback carry their generation negated; Redis
# generations are server timestamps in milliseconds, always positive.


# How long a process refuses calls on its own while all probe slots are taken, before it
# asks Redis again: a refused caller still gets the server's retry_after.
HALF_OPEN_LOCAL_REFUSAL_SECONDS = 0.05


def _load_scripts() -> dict[str, str]:
    folder = resources.files("breaker") / "lua"
    common = (folder / "common.lua").read_text()
    return {
        op: common + "\n" + (folder / f"{op}.lua").read_text()
        for op in ("admit", "record", "reset", "force_open", "read")
    }


SCRIPTS = _load_scripts()


class RedisStore:
    """Keep circuits in Redis so that every process shares them.

    A process acts on what the server told it for at most ``staleness_seconds``: a closed
    circuit with no recent failure admits without a round trip, and an open one refuses
    without one, so a healthy call costs one command (its outcome) and a refused call
    almost none. If Redis cannot be reached, circuits carry on in a per-process fallback
    and go back to Redis once it answers again.
    """

    kind = "redis"

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        prefix: str = "breaker",
        key_ttl_seconds: float = 7 * 24 * 3600,
        staleness_seconds: float = 1.0,
        reconnect_interval: float = 1.0,
    ) -> None:
        # A Sentinel master client (Sentinel.master_for) is a redis.Redis on its own pool.
        if not isinstance(client, redis.Redis | RedisCluster):
            raise ValueError(
                "client must be a redis.Redis (a Sentinel master client is one) or a "
                f"redis.cluster.RedisCluster, got {type(client).__name__}"
            )
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
        self.client = client
        self.prefix = prefix
        self.index_key = f"{prefix}:index"
        self.ttl_ms = int(key_ttl_seconds * 1000)
        self.staleness = float(staleness_seconds)
        self.reconnect_interval = float(reconnect_interval)
        self.scripts: dict[str, Script] = {
            op: client.register_script(source) for op, source in SCRIPTS.items()
        }
        self.fallback = MemoryStore()
        self._lease_prefix = f"{os.getpid()}:{uuid.uuid4().hex[:8]}:"
        self._lease_seq = 0
        self._lease_lock = threading.Lock()
        self._degraded = False
        self._retry_at = 0.0
        self._health_lock = threading.Lock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        master_name: str | None = None,
        sentinel_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RedisStore:
        """Return a store on what url names (breaker.connection), with short socket timeouts."""
        client_options = {
            key: kwargs.pop(key)
            for key in ("socket_timeout", "socket_connect_timeout", "health_check_interval")
            if key in kwargs
        }
        client = client_from_url(
            url, master_name=master_name, sentinel_kwargs=sentinel_kwargs, **client_options
        )
        return cls(client, **kwargs)

    def keys(self, name: str) -> list[str]:
        """Return the circuit hash and probe lease keys of name, in one cluster hash slot."""
        base = f"{self.prefix}:{{{name}}}"
        return [base, f"{base}:probes"]

    def bind(
        self,
        name: str,
        config: BreakerConfig,
        on_transition: TransitionHook,
        clock: Callable[[], float] | None = None,
    ) -> RedisCircuit:
        """Return the circuit called name and register it in the store's index."""
        if clock is not None:
            raise ValueError(
                "clock: RedisStore takes its time from the Redis server; "
                "an injected clock works with MemoryStore only"
            )
        circuit = RedisCircuit(self, name, config, on_transition)
        self.run(lambda: self.client.zadd(self.index_key, {name: time.time()}), lambda: 0)
        return circuit

    def names(self) -> list[str]:
        """Return the names of every circuit registered on this Redis.

        Raises redis.ConnectionError if Redis cannot be reached: a list from the fallback
        would hide breakers that other processes use.
        """
        raw = self.client.zrange(self.index_key, 0, -1)
        return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in raw)

    def next_lease(self) -> str:
        """Return a probe lease id unique across processes."""
        with self._lease_lock:
            self._lease_seq += 1
            return f"{self._lease_prefix}{self._lease_seq}"

    @property
    def degraded(self) -> bool:
        """Return True while Redis is unreachable and circuits run on the fallback."""
        return self._degraded

    def use_redis(self) -> bool:
        """Return whether to try Redis now: always when healthy, once per interval if not."""
        if not self._degraded:
            return True
        return time.monotonic() >= self._retry_at

    def run(self, command: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """Run a Redis command; on an outage switch to the fallback and run that instead."""
        if not self.use_redis():
            return fallback()
        try:
            result = command()
        except UNREACHABLE as exc:
            self._mark_down(exc)
            return fallback()
        if self._degraded:
            self._mark_up()
        return result

    def _mark_down(self, exc: Exception) -> None:
        with self._health_lock:
            self._retry_at = time.monotonic() + self.reconnect_interval
            if self._degraded:
                return
            self._degraded = True
        log.warning(
            "Circuit breaker store unreachable (%s: %s); breakers run on a per-process "
            "fallback until Redis answers again",
            type(exc).__name__, exc,
        )

    def _mark_up(self) -> None:
        with self._health_lock:
            if not self._degraded:
                return
            self._degraded = False
        log.warning("Circuit breaker store reachable again; breakers share Redis state")


class RedisCircuit:
    """One circuit in Redis as seen with one breaker's settings, with a short-lived cache."""

    def __init__(
        self, store: RedisStore, name: str, config: BreakerConfig, on_transition: TransitionHook
    ) -> None:
        self._store = store
        self._name = name
        self._config = config
        self._notify = on_transition
        self._keys = store.keys(name)
        self._argv_head = [
            config.failure_threshold,
            int(config.timeout_seconds * 1000),
            config.success_threshold,
            config.half_open_max_calls,
            int(config.lease_seconds * 1000),
            store.ttl_ms,
        ]
        self._fallback = store.fallback.bind(name, config, on_transition)
        self._pending_rejected = 0
        self._pending_lock = threading.Lock()
        # What the server last said: (state, generation, failure count, act on it until,
        # refuse locally until, retry_after ends at), times in time.monotonic. One tuple,
        # replaced whole, so a thread never reads one answer's state with another's generation.
        self._cache: tuple[CircuitState, int, int, float, float, float] = (
            CLOSED, 0, 0, 0.0, 0.0, 0.0
        )

    def admit(self) -> Ticket:
        """Admit a call or raise CircuitBreakerOpenError, asking Redis only when needed."""
        now = time.monotonic()
        store = self._store
        state, gen, fc, fresh_until, refuse_until, retry_at = self._cache
        if now < fresh_until and not store.degraded:
            if state is CLOSED and not fc:
                return (gen, None)
            if now < refuse_until:
                with self._pending_lock:
                    self._pending_rejected += 1
                raise CircuitBreakerOpenError(self._name, state, retry_at - now)
        lease = store.next_lease()
        reply = store.run(lambda: self._eval("admit", lease), lambda: None)
        if reply is None:
            return self._fallback_admit()
        admitted = self._apply(reply)
        # From the reply, not the cache: another thread or a listener may have changed the
        # cache since, and the round trip must not lengthen the wait.
        state, gen, retry_ms = CircuitState(_text(reply[1])), int(reply[2]), int(reply[5])
        if admitted:
            return (gen, lease if state is HALF_OPEN else None)
        raise CircuitBreakerOpenError(self._name, state, retry_ms / 1000)

    def record(self, ticket: Ticket, outcome: Outcome) -> None:
        """Report how an admitted call ended, in one round trip."""
        gen, lease = ticket
        if gen < 0:
            self._fallback.record((-gen, lease), outcome)
            return
        # An outcome that cannot reach Redis is lost; the fallback starts from CLOSED.
        reply = self._store.run(lambda: self._eval("record", gen, lease or "", int(outcome)),
                                lambda: None)
        if reply is not None:
            self._apply(reply)

    def view(self) -> StateView:
        """Return the state as the server sees it now."""
        reply = self._read()
        if reply is None:
            return self._fallback.view()
        return self._view_from(reply)

    def reset(self) -> None:
        """Force CLOSED with cleared consecutive counts, in a new generation."""
        self._operate("reset", self._fallback.reset)

    def force_open(self) -> None:
        """Force OPEN now; an open circuit restarts its timeout."""
        self._operate("force_open", self._fallback.force_open)

    def snapshot(self) -> dict[str, Any]:
        """Return the state and running totals as the server sees them now."""
        reply = self._read()
        if reply is None:
            snap = self._fallback.snapshot()
            snap["store"] = "fallback"
            return snap
        view = self._view_from(reply)
        fields = {_text(k): _text(v) for k, v in zip(reply[6::2], reply[7::2], strict=True)}
        totals = {
            key: int(fields.get(key, 0))
            for key in ("successes", "failures", "rejected", "half_open_successes",
                        "half_open_failures")
        }
        transitions = {k[3:]: int(v) for k, v in fields.items() if k.startswith("tr:")}
        secs = {k[5:]: int(v) / 1000 for k, v in fields.items() if k.startswith("secs:")}
        opened_ms = int(reply[4])
        opened_at = round(opened_ms / 1000, 3) if opened_ms else None
        return build_snapshot(
            self._name, self._config, view, totals, transitions, secs, opened_at, "redis"
        )

    def _fallback_admit(self) -> Ticket:
        gen, lease = self._fallback.admit()
        return (-gen, lease)

    def _take_pending(self) -> int:
        with self._pending_lock:
            pending, self._pending_rejected = self._pending_rejected, 0
        return pending

    def _eval(self, op: str, *argv: Any) -> list[Any]:
        pending = self._take_pending()
        try:
            reply: list[Any] = self._store.scripts[op](
                keys=self._keys, args=[*self._argv_head, pending, *argv]
            )
        except UNREACHABLE:
            with self._pending_lock:
                self._pending_rejected += pending
            raise
        return reply

    def _read(self) -> list[Any] | None:
        store = self._store
        return store.run(lambda: self._eval("read"), lambda: None)  # type: ignore[no-any-return]

    def _operate(self, op: str, fallback: Callable[[], None]) -> None:
        reply = self._store.run(lambda: self._eval(op), lambda: None)
        if reply is None:
            fallback()
        else:
            self._apply(reply)

    def _apply(self, reply: list[Any]) -> bool:
        """Cache what the server said and log the transitions this call made."""
        now = time.monotonic()
        status, state, gen, fc, _sc, retry_ms = reply[:6]
        circuit_state = CircuitState(_text(state))
        # retry_after is 0 whenever a call may be made, so it doubles as "refuse locally until".
        retry_after = int(retry_ms) / 1000
        refuse_for = retry_after
        if circuit_state is HALF_OPEN:
            # Probes answer in milliseconds: refusing locally for the whole retry_after would
            # turn away every call of the next second although the circuit closed long since.
            refuse_for = min(retry_after, HALF_OPEN_LOCAL_REFUSAL_SECONDS)
        self._cache = (
            circuit_state,
            int(gen),
            int(fc),
            now + self._store.staleness,
            now + refuse_for,
            now + retry_after,
        )
        events = reply[6:]
        for i in range(0, len(events), 4):
            came_from, to, cause, count = events[i : i + 4]
            self._notify(
                CircuitState(_text(came_from)), CircuitState(_text(to)), _text(cause), int(count)
            )
        return bool(status)

    def _view_from(self, reply: list[Any]) -> StateView:
        state, fc, sc, retry_ms = reply[:4]
        return StateView(CircuitState(_text(state)), int(retry_ms) / 1000, int(fc), int(sc))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
