"""AsyncRedisStore: RedisStore for asyncio, on any redis.asyncio client.

The same keys, the same Lua scripts and the same decisions (breaker/redis_core.py) as
RedisStore, so a sync process and an async one share one circuit; only the commands are
awaited. One store belongs to one event loop, as its client does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio
from redis.commands.core import AsyncScript

from breaker.connection import async_client_from_url
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

AsyncClient = redis.asyncio.Redis | redis.asyncio.RedisCluster


class AsyncRedisStore(StoreBase):
    """Keep circuits in Redis for asyncio code; shares circuits with RedisStore processes.

    The same options and the same guarantees as RedisStore: a healthy call and a refused
    call cost no command, and any Redis error switches to a per-process fallback. An async
    process should ``await store.flush()`` before its event loop ends, to send the
    successes it batched in its last second.
    """

    asynchronous = True

    def __init__(
        self,
        client: AsyncClient,
        *,
        prefix: str = "breaker",
        key_ttl_seconds: float = 7 * 24 * 3600,
        staleness_seconds: float = 1.0,
        reconnect_interval: float = 1.0,
    ) -> None:
        if not isinstance(client, redis.asyncio.Redis | redis.asyncio.RedisCluster):
            raise ValueError(
                f"client must be a redis.asyncio client (Redis or RedisCluster), "
                f"got {type(client).__name__}"
            )
        self._configure(prefix, key_ttl_seconds, staleness_seconds, reconnect_interval)
        self.client = client
        self.scripts: dict[str, AsyncScript] = {
            op: client.register_script(source) for op, source in SCRIPTS.items()
        }
        self._scheduled: dict[AsyncRedisCircuit, asyncio.TimerHandle] = {}
        self._flushing: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        master_name: str | None = None,
        sentinel_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> AsyncRedisStore:
        """Return a store on what url names (breaker.connection), with short socket timeouts."""
        client_options = cls.client_options(kwargs)
        client = async_client_from_url(
            url, master_name=master_name, sentinel_kwargs=sentinel_kwargs, **client_options
        )
        return cls(client, **kwargs)

    def bind(
        self,
        name: str,
        config: BreakerConfig,
        on_transition: TransitionHook,
        clock: Callable[[], float] | None = None,
    ) -> AsyncRedisCircuit:
        """Return the circuit called name; it registers in the index on its first command."""
        if clock is not None:
            raise ValueError(
                "clock: AsyncRedisStore takes its time from the Redis server; "
                "an injected clock works with MemoryStore only"
            )
        return AsyncRedisCircuit(self, name, config, on_transition)

    async def names(self) -> list[str]:
        """Return the names of every circuit registered on this Redis (raises if unusable)."""
        raw = await self.client.zrange(self.index_key, 0, -1)
        return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in raw)

    async def flush(self) -> None:
        """Send every count this process has batched, now."""
        for circuit in list(self._scheduled):
            self._scheduled.pop(circuit).cancel()
            await circuit.flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)

    async def run(
        self, op: str, command: Callable[[], Awaitable[Any]], fallback: Callable[[], Any]
    ) -> Any:
        """Await a Redis command; on any Redis error use the fallback instead, never raise."""
        if not self.health.use_redis():
            return fallback()
        try:
            result = await command()
        except STORE_ERRORS as exc:
            self.health.failed(exc, op)
            return fallback()
        self.health.succeeded()
        return result

    def schedule(self, circuit: AsyncRedisCircuit, deadline: float) -> None:
        """Flush circuit at deadline (time.monotonic) on the running loop."""
        if circuit in self._scheduled:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - time.monotonic())
        self._scheduled[circuit] = loop.call_later(delay, self._start_flush, circuit)

    def _start_flush(self, circuit: AsyncRedisCircuit) -> None:
        del self._scheduled[circuit]
        task = asyncio.get_running_loop().create_task(self._flush_when_due(circuit))
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _flush_when_due(self, circuit: AsyncRedisCircuit) -> None:
        deadline = circuit.flush_deadline()
        if deadline is None:
            return  # another command took the batch
        if deadline > time.monotonic():
            self.schedule(circuit, deadline)  # a batch begun since waits its turn
        else:
            await circuit.flush_in_background()


class AsyncRedisCircuit(RedisCircuitCore):
    """One circuit in Redis for asyncio code, with the same cache and batch as RedisCircuit."""

    def __init__(
        self,
        store: AsyncRedisStore,
        name: str,
        config: BreakerConfig,
        on_transition: TransitionHook,
    ) -> None:
        super().__init__(
            name, config, [*store.keys(name), store.window_key(name)], store.ttl_ms,
            store.staleness, on_transition,
            lambda deadline: store.schedule(self, deadline),
        )
        self._store = store
        self._fallback = store.fallback.bind(name, config, on_transition)
        self._indexed = False

    async def admit(self) -> Ticket:
        """Admit a call or raise CircuitBreakerOpenError, asking Redis only when needed."""
        store = self._store
        if not store.health.degraded:
            ticket = self.admit_from_cache(time.monotonic())
            if ticket is not None:
                return ticket
        lease = store.next_lease()
        reply = await self._run("admit", lambda: self._eval("admit", lease))
        if reply is None:
            gen, lease = self._fallback.admit()
            return (-gen, lease)
        return self.admitted(reply, lease)

    async def record(
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
        reply = await self._run("record", lambda: self._eval("record", *args))
        if reply is None:
            # Redis failed between admission and report: the fallback counts the outcome.
            self._fallback.record_orphan(outcome, slow, retry_after)
        else:
            self.apply(reply)

    async def view(self) -> StateView:
        """Return the state as the server sees it now."""
        reply = await self._run("read", lambda: self._eval("read"))
        if reply is None:
            return self._fallback.view()
        return self.view_from(reply)

    async def reset(self) -> None:
        """Force CLOSED with cleared consecutive counts, in a new generation."""
        await self._operate("reset", self._fallback.reset)

    async def force_open(self) -> None:
        """Force OPEN now; an open circuit restarts its timeout."""
        await self._operate("force_open", self._fallback.force_open)

    async def snapshot(self) -> dict[str, Any]:
        """Return the state and running totals as the server sees them now."""
        reply = await self._run("read", lambda: self._eval("read"))
        if reply is None:
            snap = self._fallback.snapshot()
            snap["store"] = "fallback"
            return snap
        return self.snapshot_from(reply)

    async def flush(self) -> None:
        """Send the batched counts now, if there are any."""
        if self.flush_deadline() is None:
            return
        reply = await self._run("flush", lambda: self._eval("flush"))
        if reply is not None and reply[0]:
            self.apply(reply)

    async def flush_in_background(self) -> None:
        """Send the batched counts for the flush timer, best effort and quietly.

        As RedisCircuit.flush_in_background: store trouble waits for the next command.
        """
        if self.flush_deadline() is None or self._store.health.degraded:
            return
        try:
            reply = await self._eval("flush")
        except STORE_ERRORS as exc:
            if is_script_bug(exc):
                self._store.health.failed(exc, "flush")
            return
        if reply[0]:
            self.apply(reply)

    async def _run(self, op: str, command: Callable[[], Awaitable[Any]]) -> Any:
        if not self._indexed:
            added = await self._store.run(
                "index",
                lambda: self._store.client.zadd(self._store.index_key, {self.name: time.time()}),
                lambda: None,
            )
            self._indexed = added is not None
        return await self._store.run(op, command, lambda: None)

    async def _eval(self, op: str, *argv: Any) -> list[Any]:
        batch = self.take_batch()
        try:
            reply: list[Any] = await self._store.scripts[op](
                keys=self.keys, args=self.args(batch, *argv)
            )
        except STORE_ERRORS as exc:
            # As in RedisCircuit._eval: refused before its first write, so nothing was added.
            if not is_script_bug(exc):
                self.restore_batch(batch)
            raise
        return reply

    async def _operate(self, op: str, fallback: Callable[[], None]) -> None:
        reply = await self._run(op, lambda: self._eval(op))
        if reply is None:
            fallback()
        else:
            self.apply(reply)
