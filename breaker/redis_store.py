"""RedisStore: one circuit per name shared by every process on a Redis, rules in Lua.

Every state change is one Lua script run atomically on the server with the server's
clock; docs/design.md shows the keys, the scripts and the states. The decisions a process
makes about its cache and its batched counts live in breaker/redis_core.py, shared with
AsyncRedisStore; this module sends the commands.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from breaker.connection import client_from_url
from breaker.redis_core import (
    SCRIPTS,
    STORE_ERRORS,
    SUCCESS,
    RedisCircuitCore,
    StoreBase,
    is_script_bug,
)
from breaker.state import BreakerConfig, Outcome
from breaker.store import StateView, Ticket, TransitionHook


class RedisStore(StoreBase):
    """Keep circuits in Redis so that every process shares them.

    A process acts on what the server told it for at most ``staleness_seconds``: a closed
    circuit with no recent failure admits without a round trip and batches its successes,
    and an open one refuses without one, so a healthy call and a refused call cost no
    command; a busy process sends one per circuit per ``staleness_seconds``. If Redis cannot
    be used (unreachable, or refusing: out of memory, no permission, busy...), circuits
    carry on in a per-process fallback and go back to Redis once it answers again.
    """

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
        self._configure(prefix, key_ttl_seconds, staleness_seconds, reconnect_interval)
        self.client = client
        self.scripts: dict[str, Script] = {
            op: client.register_script(source) for op, source in SCRIPTS.items()
        }
        self._flusher = _Flusher()
        _LIVE_STORES.add(self)

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
        client_options = cls.client_options(kwargs)
        client = client_from_url(
            url, master_name=master_name, sentinel_kwargs=sentinel_kwargs, **client_options
        )
        return cls(client, **kwargs)

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
        self.run("index", lambda: self.client.zadd(self.index_key, {name: time.time()}),
                 lambda: 0)
        return circuit

    def names(self) -> list[str]:
        """Return the names of every circuit registered on this Redis.

        Raises redis.RedisError if Redis cannot be used: a list from the fallback would
        hide breakers that other processes use.
        """
        raw = self.client.zrange(self.index_key, 0, -1)
        return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in raw)

    def flush(self) -> None:
        """Send every count this process has batched, now (before exit, for instance)."""
        self._flusher.flush_all()

    @property
    def reconnect_interval(self) -> float:
        """Return how often a degraded store tries Redis again, in seconds."""
        return self.health.reconnect_interval

    def use_redis(self) -> bool:
        """Return whether to try Redis now: always when healthy, once per interval if not."""
        return self.health.use_redis()

    def run(self, op: str, command: Callable[[], Any], fallback: Callable[[], Any]) -> Any:
        """Run a Redis command; on any Redis error use the fallback instead, never raise."""
        if not self.health.use_redis():
            return fallback()
        try:
            result = command()
        except STORE_ERRORS as exc:
            self.health.failed(exc, op)
            return fallback()
        self.health.succeeded()
        return result

    def _forget_batches(self) -> None:
        self._flusher.forget()


class RedisCircuit(RedisCircuitCore):
    """One circuit in Redis as seen with one breaker's settings, with a short-lived cache."""

    def __init__(
        self, store: RedisStore, name: str, config: BreakerConfig, on_transition: TransitionHook
    ) -> None:
        super().__init__(
            name, config, [*store.keys(name), store.window_key(name)], store.ttl_ms,
            store.staleness, on_transition,
            lambda deadline: store._flusher.schedule(self, deadline),
        )
        self._store = store
        self._fallback = store.fallback.bind(name, config, on_transition)

    def admit(self) -> Ticket:
        """Admit a call or raise CircuitBreakerOpenError, asking Redis only when needed."""
        store = self._store
        if not store.health.degraded:
            ticket = self.admit_from_cache(time.monotonic())
            if ticket is not None:
                return ticket
        lease = store.next_lease()
        reply = store.run("admit", lambda: self._eval("admit", lease), lambda: None)
        if reply is None:
            gen, lease = self._fallback.admit()
            return (-gen, lease)
        return self.admitted(reply, lease)

    def record(
        self, ticket: Ticket, outcome: Outcome, slow: bool = False, retry_after: float = 0.0
    ) -> None:
        """Report how an admitted call ended; a healthy success costs no command."""
        gen, lease = ticket
        if gen < 0:
            self._fallback.record((-gen, lease), outcome, slow, retry_after)
            return
        if outcome is SUCCESS and not (lease or slow) and self.batch_success(gen):
            return
        args = self.record_args(ticket, outcome, slow, retry_after)
        reply = self._store.run("record", lambda: self._eval("record", *args), lambda: None)
        if reply is None:
            # Redis failed between admission and report: the fallback counts the outcome.
            self._fallback.record_orphan(outcome, slow, retry_after)
        else:
            self.apply(reply)

    def view(self) -> StateView:
        """Return the state as the server sees it now."""
        reply = self._read()
        if reply is None:
            return self._fallback.view()
        return self.view_from(reply)

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
        return self.snapshot_from(reply)

    def flush(self) -> None:
        """Send the batched counts now, if there are any."""
        if self.flush_deadline() is None:
            return
        reply = self._store.run("flush", lambda: self._eval("flush"), lambda: None)
        if reply is not None and reply[0]:
            self.apply(reply)

    def flush_in_background(self) -> None:
        """Send the batched counts for the flush thread, best effort and quietly.

        Store trouble here changes nothing and logs nothing: the counts wait for this
        process's next command, which will meet the trouble and report it (a process that
        has gone quiet, or whose store was dropped, is not woken again). A bug still logs.
        """
        if self.flush_deadline() is None or self._store.health.degraded:
            return
        try:
            reply = self._eval("flush")
        except STORE_ERRORS as exc:
            if is_script_bug(exc):
                self._store.health.failed(exc, "flush")
            return
        if reply[0]:
            self.apply(reply)

    def _eval(self, op: str, *argv: Any) -> list[Any]:
        batch = self.take_batch()
        try:
            reply: list[Any] = self._store.scripts[op](keys=self.keys, args=self.args(batch, *argv))
        except STORE_ERRORS as exc:
            # Redis refused the script before its first write (common.lua's begin()), so the
            # counts were not added: keep them for a later command. A script bug may have
            # stopped anywhere, so its counts are dropped rather than risk adding them twice.
            if not is_script_bug(exc):
                self.restore_batch(batch)
            raise
        return reply

    def _read(self) -> list[Any] | None:
        return self._store.run("read", lambda: self._eval("read"), lambda: None)  # type: ignore[no-any-return]

    def _operate(self, op: str, fallback: Callable[[], None]) -> None:
        reply = self._store.run(op, lambda: self._eval(op), lambda: None)
        if reply is None:
            fallback()
        else:
            self.apply(reply)


class _Flusher:
    """Send each circuit's batch by its deadline, from a daemon thread that runs while needed."""

    def __init__(self) -> None:
        self._due: dict[RedisCircuit, float] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self, circuit: RedisCircuit, deadline: float) -> None:
        """Flush circuit at deadline (time.monotonic) unless it is already due sooner."""
        with self._wake:
            if circuit in self._due and self._due[circuit] <= deadline:
                return
            self._due[circuit] = deadline
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="breaker-flush", daemon=True
                )
                self._thread.start()
            else:
                self._wake.notify()

    def flush_all(self) -> None:
        """Flush every circuit with a batch now, in the calling thread."""
        with self._wake:
            circuits = list(self._due)
        for circuit in circuits:
            circuit.flush()

    def forget(self) -> None:
        """Drop every batch and the thread (in a forked child, where neither is ours)."""
        self._wake = threading.Condition()
        self._thread = None
        for circuit in self._due:
            circuit.forget_batch()
        self._due.clear()

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._due:
                    self._thread = None
                    return
                now = time.monotonic()
                soonest = min(self._due.values())
                if soonest > now:
                    self._wake.wait(soonest - now)
                    continue
                ready = [c for c, deadline in self._due.items() if deadline <= now]
                for circuit in ready:
                    del self._due[circuit]
            for circuit in ready:
                deadline = circuit.flush_deadline()
                if deadline is None:
                    continue  # another command took the batch
                if deadline > now:
                    self.schedule(circuit, deadline)  # a batch begun since waits its turn
                else:
                    circuit.flush_in_background()


# Every RedisStore of the process, whose batches a forked child must not send again. There
# is no flush at exit: it could hang a shutdown on an unreachable Redis; a process that
# wants its last counts sent calls flush() (the flush thread sends them within staleness).
_LIVE_STORES: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _forget_batches_in_child() -> None:
    for store in list(_LIVE_STORES):
        store._forget_batches()


os.register_at_fork(after_in_child=_forget_batches_in_child)
