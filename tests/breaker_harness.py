"""One breaker factory per store for the behavioural suites, and how each moves its clock.

MemoryStore runs on a fake clock stepped by hand; RedisStore (staleness 0, so every call
asks the server) runs on the Redis server's clock, so `advance` waits until the server's
time has moved on.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from breaker import CircuitBreaker, MemoryStore, RedisStore, Store

NAME = "payments.card"
# Short enough for Redis tests to wait it out in real time.
TIMEOUT = 0.3


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def server_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


def wait_server_time(client: redis.Redis, seconds: float) -> None:
    """Return once the Redis server's clock has moved on by at least seconds."""
    # One millisecond more: the scripts read the clock in whole milliseconds.
    target = server_time(client) + seconds + 0.001
    deadline = time.monotonic() + seconds + 10.0
    while server_time(client) < target:
        assert time.monotonic() < deadline, "the Redis server clock did not advance"
        time.sleep(min(0.01, seconds / 5))


@dataclass
class Harness:
    """Makes breakers on one store and moves that store's clock forward."""

    kind: str
    store: Store
    advance: Callable[[float], None]

    def make(self, name: str = NAME, **settings: Any) -> CircuitBreaker:
        options: dict[str, Any] = {
            "failure_threshold": 3,
            "timeout_seconds": TIMEOUT,
            "success_threshold": 2,
            "half_open_max_calls": 2,
            **settings,
        }
        return CircuitBreaker(name, store=self.store, **options)


def harness_for(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """Yield a Harness on MemoryStore(fake clock) or RedisStore(staleness 0), per request.param."""
    if request.param == "memory":
        clock = FakeClock()
        yield Harness("memory", MemoryStore(clock=clock), clock.advance)
        return
    url: str = request.getfixturevalue("redis_url")
    store = RedisStore.from_url(url, staleness_seconds=0)
    yield Harness("redis", store, functools.partial(wait_server_time, store.client))
    store.client.close()
