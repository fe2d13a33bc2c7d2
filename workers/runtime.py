"""What one worker process holds: settings, Redis pool, breakers, provider; made after fork."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from breaker import BreakerRegistry, RedisStore
from breaker.connection import client_from_url
from workers.config import Settings, read_settings
from workers.orders import OrderBook
from workers.parking import Parking
from workers.provider import Provider, load_provider

if TYPE_CHECKING:
    from celery import Celery


@dataclass
class Runtime:
    """The per-process resources every task uses."""

    settings: Settings
    # A redis.Redis (one server or a Sentinel master) or a redis.cluster.RedisCluster.
    redis: Any
    store: RedisStore
    registry: BreakerRegistry
    orders: OrderBook
    parking: Parking
    provider: Provider
    pid: int
    # The breakers this process's releaser last saw OPEN: the gate (workers.gate) parks
    # their charges as they arrive. Replaced whole, never changed in place.
    refusing: frozenset[str] = frozenset()

    def close(self) -> None:
        """Send the batched breaker counts and release connections."""
        self.store.flush()
        self.provider.close()
        self.redis.close()


_runtimes: dict[int, Runtime] = {}
_lock = threading.Lock()


def runtime(app: Celery) -> Runtime:
    """Return this process's runtime for app, building it on first use in each process."""
    key = id(app)
    current = _runtimes.get(key)
    if current is not None and current.pid == os.getpid():
        return current
    with _lock:
        current = _runtimes.get(key)
        if current is None or current.pid != os.getpid():
            current = _runtimes[key] = build_runtime(read_settings(app.conf))
    return current


def build_runtime(settings: Settings) -> Runtime:
    """Return fresh connections and breakers for the settings."""
    client = breaker_client(settings)
    store = RedisStore(client)
    registry = BreakerRegistry(
        store, defaults=settings.breaker_defaults, overrides=settings.breaker_overrides
    )
    orders = OrderBook(
        client,
        result_ttl=settings.payment_result_ttl,
        lock_ttl=settings.order_lock_ttl,
        replicas=settings.journal_replicas,
    )
    return Runtime(
        settings=settings,
        redis=client,
        store=store,
        registry=registry,
        orders=orders,
        parking=Parking(client),
        provider=load_provider(settings),
        pid=os.getpid(),
    )


def breaker_client(settings: Settings, **options: Any) -> Any:
    """Return a client of the breaker store: one Redis, a Sentinel master or a Cluster."""
    return client_from_url(
        settings.breaker_redis_url,
        master_name=settings.breaker_redis_master_name or None,
        sentinel_kwargs=settings.breaker_redis_sentinel_kwargs or None,
        **{"socket_timeout": 2.0, "socket_connect_timeout": 1.0, **options},
    )


def flush_runtimes() -> None:
    """Send the breaker counts this process's runtimes batched, best effort."""
    for current in list(_runtimes.values()):
        if current.pid == os.getpid():
            current.store.flush()


def forget(app: Celery) -> None:
    """Drop app's runtime in this process (after a fork, or when its settings change)."""
    with _lock:
        stale = _runtimes.pop(id(app), None)
    if stale is not None and stale.pid == os.getpid():
        stale.close()
