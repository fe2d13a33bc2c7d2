"""RedisStore on a Sentinel master client, on real servers: sharing, auth, and failovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter

import pytest
import redis

from breaker import CircuitBreaker, CircuitBreakerOpenError, CircuitState, RedisStore
from breaker.connection import (
    MASTER_CHECK_SECONDS,
    MasterFollowingPool,
    async_client_from_url,
    client_from_url,
    safe_url,
)
from tests.dependencies import ProviderDown
from tests.redis_server import free_port
from tests.topologies import SentinelTopology, running
from tests.waiting import wait_until

OPEN = CircuitState.OPEN
NAME = "payments.card"
HASH_KEY = "breaker:{payments.card}"
STORE_CLIENT_NAME = "pb-store-under-test"


def down() -> str:
    raise ProviderDown


def up() -> str:
    return "charged"


def open_circuit(store: RedisStore) -> CircuitBreaker:
    cb = CircuitBreaker(NAME, store=store, failure_threshold=2, timeout_seconds=60)
    for _ in range(2):
        with pytest.raises(ProviderDown):
            cb.call(down)
    assert cb.state is OPEN
    return cb


def circuit_on(topology: SentinelTopology, port: int) -> dict[str, str]:
    """Return the circuit's hash as the server on port holds it."""
    client = topology.client(port)
    try:
        return {k.decode(): v.decode() for k, v in client.hgetall(HASH_KEY).items()}
    finally:
        client.close()


def talks_to(topology: SentinelTopology, port: int, client_name: str) -> bool:
    """Return True if a connection named client_name is open on the server on port."""
    client = topology.client(port)
    try:
        return any(c.get("name") == client_name for c in client.client_list())
    finally:
        client.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "breaker" and r.levelno == logging.WARNING]


def test_store_on_the_sentinel_master_shares_the_circuit_with_a_client_of_the_master(
    sentinel_topology: SentinelTopology,
) -> None:
    store = RedisStore.from_url(sentinel_topology.url, master_name=sentinel_topology.master_name)
    assert isinstance(store.client, redis.Redis)
    assert isinstance(store.client.connection_pool, MasterFollowingPool)

    open_circuit(store)

    direct = RedisStore.from_url(f"redis://127.0.0.1:{sentinel_topology.master_port}/0")
    assert CircuitBreaker(NAME, store=direct).state is OPEN
    assert circuit_on(sentinel_topology, sentinel_topology.master_port)["state"] == "open"
    assert store.names() == [NAME]
    store.client.close()
    direct.client.close()


def test_url_password_is_the_masters_and_sentinel_kwargs_carry_the_sentinels() -> None:
    with running(SentinelTopology(password="master-pw", sentinel_password="sentinel-pw")) as t:
        url = t.url.replace("sentinel://", "sentinel://:master-pw@")
        assert "master-pw" not in safe_url(url)
        store = RedisStore.from_url(url, master_name=t.master_name,
                                    sentinel_kwargs={"password": "sentinel-pw"})
        open_circuit(store)
        assert not store.degraded
        assert circuit_on(t, t.master_port)["state"] == "open"

        # Without the sentinels' password no sentinel names the master: the breaker falls
        # back instead of failing its caller.
        locked_out = RedisStore.from_url(url, master_name=t.master_name)
        cb = CircuitBreaker(NAME, store=locked_out)
        assert cb.call(up) == "charged"
        assert locked_out.degraded
        store.client.close()
        locked_out.client.close()


def test_a_dead_sentinel_listed_first_costs_the_first_call_no_wait(
    sentinel_topology: SentinelTopology,
) -> None:
    url = f"sentinel://127.0.0.1:{free_port()};{sentinel_topology.url}"
    store = RedisStore.from_url(url, master_name=sentinel_topology.master_name)

    began = time.monotonic()
    cb = CircuitBreaker(NAME, store=store)
    assert cb.call(up) == "charged"
    elapsed = time.monotonic() - began

    # With redis-py's own retries on the sentinel clients this took over 4 s.
    assert elapsed < 0.5
    assert not store.degraded
    assert cb.snapshot()["store"] == "redis"
    store.client.close()


def test_forced_failover_mid_run_keeps_the_open_circuit_and_moves_the_store_to_the_new_master(
    sentinel_topology: SentinelTopology, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="breaker")
    topology = sentinel_topology
    client = client_from_url(topology.url, master_name=topology.master_name,
                             client_name=STORE_CLIENT_NAME)
    store = RedisStore(client, staleness_seconds=0)
    cb = open_circuit(store)
    before = circuit_on(topology, topology.master_port)
    topology.wait_replicated()
    old, new = topology.master_port, topology.replica_port

    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                cb.call(up)
                outcomes["called"] += 1
            except CircuitBreakerOpenError as exc:
                outcomes[exc.state.value] += 1
            except Exception as exc:  # counted: the assertions below say it never happens
                outcomes[repr(exc)] += 1
            if store.degraded:
                outcomes["degraded"] += 1
            stop.wait(0.005)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    topology.failover()
    # redis-py's own pool stayed on the old master until the sentinel demoted it, ~10 s on.
    wait_until(lambda: talks_to(topology, new, STORE_CLIENT_NAME),
               MASTER_CHECK_SECONDS + 3.0, "the store to talk to the new master")
    calls_when_moved = sum(outcomes.values())
    wait_until(lambda: sum(outcomes.values()) >= calls_when_moved + 20, 5.0,
               "more calls on the new master")
    stop.set()
    runner.join(timeout=5)

    # Every call, before, during and after the failover, met the open circuit; none saw an
    # error, none ran on the fallback, nothing was logged.
    assert set(outcomes) == {"open"}, outcomes
    assert warnings_of(caplog) == []
    assert not talks_to(topology, old, STORE_CLIENT_NAME)
    on_new = circuit_on(topology, new)
    assert (on_new["state"], on_new["gen"]) == ("open", before["gen"])
    # Writes go to the new master.
    cb.reset()
    assert circuit_on(topology, new)["state"] == "closed"
    assert cb.state is CircuitState.CLOSED
    store.client.close()


def test_killed_master_fails_over_with_one_warning_and_the_store_comes_back_with_the_state(
    sentinel_topology: SentinelTopology, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")
    topology = sentinel_topology
    store = RedisStore.from_url(topology.url, master_name=topology.master_name,
                                staleness_seconds=0, reconnect_interval=0.2)
    cb = open_circuit(store)
    topology.wait_replicated()
    began = time.monotonic()
    topology.kill_master()

    fell_back: list[bool] = []

    def back_on_redis() -> bool:
        with contextlib.suppress(CircuitBreakerOpenError):
            cb.call(up)
        fell_back.append(store.degraded)
        return any(fell_back) and not store.degraded and cb.snapshot()["store"] == "redis"

    wait_until(back_on_redis, 20.0, "the store to fall back, then use the new master")
    back_after = time.monotonic() - began

    assert topology.reported_master() == [topology.master_port]
    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("Circuit breaker store unreachable")
    assert warnings[1].startswith("Circuit breaker store reachable again")
    # The state replicated before the crash is the new master's.
    assert cb.state is OPEN
    assert circuit_on(topology, topology.master_port)["state"] == "open"
    assert back_after < 15.0
    store.client.close()


def test_async_master_client_follows_a_forced_failover(
    sentinel_topology: SentinelTopology,
) -> None:
    topology = sentinel_topology
    loop = asyncio.new_event_loop()
    client = async_client_from_url(topology.url, master_name=topology.master_name)
    loop.run_until_complete(client.set("probe", "before"))
    topology.wait_replicated()
    new = topology.replica_port
    topology.failover()
    writes = iter(range(1_000_000))

    def write_lands_on_new_master() -> bool:
        value = str(next(writes))
        loop.run_until_complete(client.set("probe", value))
        direct = topology.client(new)
        try:
            return direct.get("probe") == value.encode()
        finally:
            direct.close()

    try:
        wait_until(write_lands_on_new_master, MASTER_CHECK_SECONDS + 3.0,
                   "an async write to reach the new master")
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
