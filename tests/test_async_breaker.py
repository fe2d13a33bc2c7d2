"""AsyncCircuitBreaker on MemoryStore and AsyncRedisStore: CircuitBreaker's rules, awaited.

Each test runs its scenario with asyncio.run; the Redis store is a real redis-server's,
shared with sync RedisStore breakers to show that both kinds of process see one circuit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio

from breaker import (
    AsyncCircuitBreaker,
    AsyncRedisStore,
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    MemoryStore,
    RedisStore,
)
from tests.breaker_harness import FakeClock
from tests.dependencies import Declined, ProviderDown, not_declined
from tests.redis_server import RedisServer

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
NAME = "payments.card"
TIMEOUT = 0.2


@dataclass
class AsyncHarness:
    """Makes async breakers on one store and moves that store's clock forward."""

    kind: str
    make_store: Callable[[], Any]
    advance: Callable[[float], Awaitable[None]]

    def make(self, store: Any, name: str = NAME, **settings: Any) -> AsyncCircuitBreaker:
        options: dict[str, Any] = {
            "failure_threshold": 3, "timeout_seconds": TIMEOUT, "success_threshold": 2,
            "half_open_max_calls": 2, **settings,
        }
        return AsyncCircuitBreaker(name, store=store, **options)


async def eventually(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Return once condition() is true, polling without blocking the loop; fail after within."""
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, f"still waiting, after {within}s, for {what}"
        await asyncio.sleep(0.01)


@pytest.fixture(params=["memory", "redis"])
def harness(request: pytest.FixtureRequest) -> Iterator[AsyncHarness]:
    """Yield an async breaker factory on MemoryStore(fake clock) or AsyncRedisStore."""
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def step(seconds: float) -> None:
            clock.advance(seconds)

        yield AsyncHarness("memory", lambda: store, step)
        return
    url: str = request.getfixturevalue("redis_url")

    async def wait(seconds: float) -> None:
        deadline = time.monotonic() + seconds + 0.002
        await eventually(lambda: _past(deadline), seconds + 5, "the clock to move on")

    yield AsyncHarness("redis", lambda: AsyncRedisStore.from_url(url, staleness_seconds=0), wait)


async def _past(deadline: float) -> bool:
    return time.monotonic() >= deadline


async def close(store: Any) -> None:
    if isinstance(store, AsyncRedisStore):
        await store.client.aclose()


async def charged() -> str:
    return "charged"


async def down() -> str:
    raise ProviderDown("503 from the provider")


async def fail(cb: AsyncCircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ProviderDown):
            await cb.call(down)


def test_call_returns_the_result_and_failures_open_the_circuit(harness: AsyncHarness) -> None:
    async def scenario() -> None:
        store = harness.make_store()
        cb = harness.make(store)
        reached: list[int] = []

        async def add(a: int, *, b: int) -> int:
            reached.append(a)
            return a + b

        assert await cb.call(add, 40, b=2) == 42
        await fail(cb, 3)
        assert await cb.state() is OPEN
        with pytest.raises(CircuitBreakerOpenError) as refused:
            await cb.call(add, 1, b=1)
        assert refused.value.state is OPEN
        assert 0 < refused.value.retry_after <= TIMEOUT + 1e-9
        assert 0 < await cb.retry_after() <= TIMEOUT + 1e-9
        assert reached == [40]
        snap = await cb.snapshot()
        assert (snap["calls"], snap["failures"], snap["rejected"]) == (4, 3, 1)
        await close(store)

    asyncio.run(scenario())


def test_half_open_probes_close_the_circuit_and_a_reset_clears_counts(
    harness: AsyncHarness,
) -> None:
    async def scenario() -> None:
        store = harness.make_store()
        cb = harness.make(store, is_failure=not_declined)
        await fail(cb, 3)
        await harness.advance(TIMEOUT)
        assert await cb.state() is HALF_OPEN

        with pytest.raises(Declined):
            await cb.call(_declined)
        assert await cb.success_count() == 1
        assert await cb.call(charged) == "charged"

        assert await cb.state() is CLOSED
        await fail(cb, 2)
        assert await cb.failure_count() == 2
        await cb.reset()
        assert await cb.failure_count() == 0
        await cb.force_open()
        assert await cb.state() is OPEN
        await close(store)

    asyncio.run(scenario())


async def _declined() -> str:
    raise Declined("402")


def test_decorator_guards_an_async_function_and_refuses_a_plain_one(
    harness: AsyncHarness,
) -> None:
    async def scenario() -> None:
        store = harness.make_store()
        cb = harness.make(store, failure_threshold=1)

        @cb
        async def charge(amount: int) -> int:
            """Charge an amount."""
            if amount < 0:
                raise ProviderDown
            return amount

        assert charge.__name__ == "charge"
        assert charge.__doc__ == "Charge an amount."
        assert await charge(5) == 5
        with pytest.raises(ProviderDown):
            await charge(-1)
        with pytest.raises(CircuitBreakerOpenError):
            await charge(6)
        with pytest.raises(TypeError, match="async def"):
            cb(lambda: None)  # type: ignore[arg-type, return-value]
        await close(store)

    asyncio.run(scenario())


def test_permit_block_reports_the_block_and_frees_a_probe_when_cancelled(
    harness: AsyncHarness,
) -> None:
    async def scenario() -> None:
        store = harness.make_store()
        cb = harness.make(store, half_open_max_calls=1)

        async with cb.permit() as permit:
            assert not permit.is_probe
        with pytest.raises(ProviderDown):
            async with cb.permit():
                await down()
        assert await cb.failure_count() == 1
        async with cb.permit() as permit:
            await permit.failure(ProviderDown(), retry_after=0)
        assert await cb.failure_count() == 2

        await fail(cb)
        await harness.advance(TIMEOUT)
        probe_started = asyncio.Event()

        async def probe() -> None:
            async with cb.permit() as permit:
                assert permit.is_probe
                probe_started.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(probe())
        await probe_started.wait()
        with pytest.raises(CircuitBreakerOpenError):
            await cb.allow()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        permit = await cb.allow()
        assert permit.is_probe
        await permit.success()
        snap = await cb.snapshot()
        assert (snap["calls"], snap["failures"], snap["rejected"]) == (5, 3, 1)
        await close(store)

    asyncio.run(scenario())


def test_policies_apply_to_async_calls(harness: AsyncHarness) -> None:
    async def scenario() -> None:
        store = harness.make_store()
        slow = harness.make(store, "payments.slow", failure_threshold=100, minimum_calls=1,
                            slow_call_seconds=0.1, timeout_seconds=30.0)
        waited = harness.make(store, "payments.waited", failure_threshold=1,
                              max_timeout_seconds=60.0)

        async def crawl() -> str:
            await harness.advance(0.15)
            return "charged"

        assert await slow.call(crawl) == "charged"
        permit = await waited.allow()
        await permit.failure(ProviderDown(), retry_after=20)

        assert await slow.state() is OPEN
        assert (await slow.snapshot())["open_cause"] == "slow_calls"
        assert 19 < await waited.retry_after() <= 20
        assert (await waited.snapshot())["open_cause"] == "retry_after"
        await close(store)

    asyncio.run(scenario())


# --- AsyncRedisStore -----------------------------------------------------------------


def test_sync_and_async_processes_share_one_circuit(redis_url: str) -> None:
    sync_store = RedisStore.from_url(redis_url, staleness_seconds=0)
    sync_cb = CircuitBreaker(NAME, store=sync_store, timeout_seconds=30.0)

    async def scenario() -> None:
        store = AsyncRedisStore.from_url(redis_url, staleness_seconds=0)
        cb = AsyncCircuitBreaker(NAME, store=store, timeout_seconds=30.0)
        with pytest.raises(ProviderDown):
            sync_cb.call(_sync_down)
        await fail(cb)
        with pytest.raises(ProviderDown):
            sync_cb.call(_sync_down)

        assert await cb.state() is OPEN
        assert sync_cb.state is OPEN
        await cb.reset()
        assert sync_cb.state is CLOSED
        assert await store.names() == [NAME]
        await store.client.aclose()

    asyncio.run(scenario())
    assert sync_cb.snapshot()["transitions"] == {"closed->open": 1, "open->closed": 1}
    sync_store.client.close()


def _sync_down() -> str:
    raise ProviderDown


def evalsha_calls(client: redis.Redis) -> int:
    stats: dict[str, dict[str, Any]] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_healthy_async_calls_send_no_command_and_flush_sends_their_successes(
    redis_url: str, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        store = AsyncRedisStore.from_url(redis_url, staleness_seconds=5.0)
        cb = AsyncCircuitBreaker(NAME, store=store)
        # Once each, so that Redis has loaded both scripts (a first EVALSHA is refused).
        await cb.call(charged)
        await store.flush()
        before = evalsha_calls(redis_client)
        for _ in range(200):
            await cb.call(charged)
        assert evalsha_calls(redis_client) == before
        await store.flush()
        assert evalsha_calls(redis_client) == before + 1
        assert (await cb.snapshot())["calls"] == 1 + 200
        await store.client.aclose()

    asyncio.run(scenario())


def test_an_idle_async_process_sends_its_successes_within_staleness(
    redis_url: str, redis_client: redis.Redis
) -> None:
    observer = CircuitBreaker(NAME, store=RedisStore(redis_client, staleness_seconds=0))

    async def scenario() -> None:
        store = AsyncRedisStore.from_url(redis_url, staleness_seconds=0.3)
        cb = AsyncCircuitBreaker(NAME, store=store)
        for _ in range(10):
            await cb.call(charged)

        async def arrived() -> bool:
            return bool(observer.snapshot()["calls"] == 10)

        await eventually(arrived, 0.3 + 2.0, "the batched successes to reach Redis")
        await store.client.aclose()

    asyncio.run(scenario())


def test_async_store_falls_back_with_one_warning_when_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")
    with RedisServer() as server:
        url = server.url

    async def scenario() -> None:
        store = AsyncRedisStore.from_url(url, reconnect_interval=0.05)
        cb = AsyncCircuitBreaker(NAME, store=store, failure_threshold=2)
        assert await cb.call(charged) == "charged"
        await fail(cb, 2)
        with pytest.raises(CircuitBreakerOpenError):
            await cb.call(charged)
        assert (await cb.snapshot())["store"] == "fallback"
        assert store.degraded
        await store.client.aclose()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("Circuit breaker store unreachable (ConnectionError:")


def test_each_breaker_refuses_the_other_kinds_store(redis_url: str) -> None:
    sync_store = RedisStore.from_url(redis_url)
    with pytest.raises(ValueError, match=r"\bstore\b.*block the event loop"):
        AsyncCircuitBreaker(NAME, store=sync_store)  # type: ignore[arg-type]
    sync_store.client.close()

    async def scenario() -> None:
        store = AsyncRedisStore.from_url(redis_url)
        with pytest.raises(ValueError, match=r"\bstore\b.*AsyncCircuitBreaker"):
            CircuitBreaker(NAME, store=store)  # type: ignore[arg-type]
        await store.client.aclose()

    asyncio.run(scenario())


def test_async_redis_store_takes_only_an_asyncio_client(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(ValueError, match=r"\bclient\b"):
        AsyncRedisStore(client)  # type: ignore[arg-type]
    client.close()
    with pytest.raises(ValueError, match=r"\burl\b"):
        AsyncRedisStore.from_url("http://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match=r"\bclock\b"):
        AsyncCircuitBreaker(
            NAME, store=AsyncRedisStore(redis.asyncio.Redis()), clock=time.monotonic
        )
