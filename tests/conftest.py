"""Fixtures that start real servers: a private redis-server per session, a clean db per test."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from tests.embedded import Worker, embedded_workers
from tests.redis_server import RedisServer
from tests.topologies import ClusterTopology, SentinelTopology, running
from workers.celery import create_app
from workers.sandbox import SandboxControl, SandboxServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Start one redis-server on a free port for the whole session."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """Return the private Redis's URL, emptied before each test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """Return a client of the private Redis, emptied before the test."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def spare_redis_server() -> Iterator[RedisServer]:
    """Start a redis-server of the test's own, free to be stopped and restarted."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


# Redis topologies: a master and a replica under Sentinel, a 3-master Cluster. Each skips,
# saying why, on a machine whose redis-server or redis-cli cannot run it.


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterTopology]:
    """Start a 3-master Redis Cluster for the whole session."""
    with running(ClusterTopology()) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: ClusterTopology) -> str:
    """Return the session cluster's redis+cluster:// URL, every node emptied before the test."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture
def sentinel_topology() -> Iterator[SentinelTopology]:
    """Start a master, a replica and a sentinel of the test's own: a failover swaps them."""
    with running(SentinelTopology()) as topology:
        yield topology


class _ScriptErrors(logging.Handler):
    """The breaker's "script failed" ERROR records: a bug the library hides from its callers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "breaker_script_error", False):
            self.records.append(record)


@pytest.fixture(autouse=True)
def breaker_script_errors() -> Iterator[list[logging.LogRecord]]:
    """Fail the test if a breaker Lua script failed during it.

    In production the breaker logs a script error and carries on from its fallback, so
    that its callers never crash; here it must not go unnoticed. A test that provokes one
    on purpose asks for this fixture and empties the list it yields.
    """
    handler = _ScriptErrors()
    logger = logging.getLogger("breaker")
    logger.addHandler(handler)
    yield handler.records
    logger.removeHandler(handler)
    if handler.records:
        pytest.fail(
            "a breaker script failed: " + "; ".join(r.getMessage() for r in handler.records),
            pytrace=False,
        )


# The Celery side: a sandbox provider over real HTTP, and apps configured for short timeouts.

SETTING_PREFIXES = ("BREAKER_", "PAYMENT_", "CELERY_")

# Short enough that an outage, a probe and a recovery take tenths of seconds.
FAST_SETTINGS: dict[str, Any] = {
    "breaker_timeout": 0.5,
    "breaker_publish_interval": 0.5,
    "payment_provider_timeout": 1.0,
    "payment_retry_backoff": 0.05,
    "payment_retry_backoff_max": 0.2,
    "payment_charge_deadline": 30.0,
    "payment_release_interval": 0.1,
}


@pytest.fixture(autouse=True)
def _no_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's or CI's BREAKER_*/PAYMENT_*/CELERY_* variables out of the tests."""
    for name in list(os.environ):
        if name.startswith(SETTING_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """Run one sandbox provider on a free port for the whole session."""
    with SandboxServer() as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> Iterator[SandboxControl]:
    """Return a control client of the sandbox, its ledger and faults reset before the test."""
    with SandboxControl(sandbox_server.url) as control:
        control.reset()
        yield control


@pytest.fixture
def make_app(redis_url: str, sandbox_server: SandboxServer) -> Callable[..., Celery]:
    """Return a factory of configured apps on the private Redis and the sandbox."""
    counter = itertools.count(1)

    def make(**conf: Any) -> Celery:
        settings = {
            "broker_url": redis_url,
            "result_backend": redis_url,
            "payment_provider_url": sandbox_server.url,
            **FAST_SETTINGS,
            **conf,
        }
        return create_app(f"test-app-{next(counter)}", **settings)

    return make


@pytest.fixture
def start(make_app: Callable[..., Celery]) -> Iterator[Callable[..., Worker]]:
    """Return a function that starts an embedded worker (threads pool) with given settings."""
    yield from embedded_workers(make_app)
