"""RedisStore on a real 3-master Redis Cluster: one slot per breaker, breakers on every node.

The behavioural scenarios imported from test_state_machine.py run here again, with this
module's `harness`: RedisStore over a RedisCluster client.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio.cluster
from redis.crc import key_slot

from breaker import (
    AsyncCircuitBreaker,
    AsyncRedisStore,
    BreakerRegistry,
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    RedisStore,
)
from breaker.connection import async_client_from_url
from tests.dependencies import ProviderDown
from tests.test_state_machine import (  # noqa: F401 - collected here, run on the cluster
    Harness,
    test_circuit_opens_after_exactly_failure_threshold_consecutive_failures,
    test_each_transition_is_logged_exactly_once_with_the_contract_text,
    test_force_open_rejects_calls_for_one_timeout,
    test_half_open_admits_max_calls_probes_and_rejects_the_next,
    test_open_circuit_rejects_without_calling_the_function,
    test_probe_failure_reopens_the_circuit_and_restarts_the_timeout,
    test_probe_lease_expiry_frees_the_slot_of_a_probe_that_never_reports,
    test_reset_closes_and_clears_counts_but_keeps_totals,
    test_snapshot_counts_a_full_open_and_recovery_cycle,
    test_stale_permit_from_before_opening_does_not_change_the_new_state,
    test_state_reports_half_open_as_soon_as_the_timeout_passed_without_a_call,
    test_success_threshold_probe_successes_close_the_circuit,
    wait_server_time,
)
from tests.topologies import ClusterTopology, running
from tests.waiting import wait_until

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

METHODS = ("card", "paypal", "sepa", "ideal", "klarna", "bancontact", "giropay", "eps")


@pytest.fixture
def harness(cluster_url: str) -> Iterator[Harness]:
    """Yield a breaker factory on RedisStore(staleness 0) over the session cluster."""
    store = RedisStore.from_url(cluster_url, staleness_seconds=0)
    assert isinstance(store.client, redis.cluster.RedisCluster)
    yield Harness("redis", store, functools.partial(wait_server_time, store.client))
    store.client.close()


def names_on_every_node(cluster: ClusterTopology) -> dict[int, str]:
    """Return one breaker name per master (port -> name), by where {name} hashes."""
    found: dict[int, str] = {}
    candidates = [f"payments.{m}" for m in METHODS] + [f"payments.m{i}" for i in range(200)]
    for name in candidates:
        found.setdefault(cluster.node_of_slot(key_slot(name.encode())), name)
        if len(found) == len(cluster.ports):
            return found
    raise AssertionError("no breaker names found for every node")


def down() -> str:
    raise ProviderDown


def up() -> str:
    return "charged"


def test_each_breakers_keys_live_in_one_slot_on_the_node_that_serves_it(
    redis_cluster: ClusterTopology, cluster_url: str
) -> None:
    # One node in the URL: the client finds the others from it.
    one_node = f"redis+cluster://127.0.0.1:{redis_cluster.ports[-1]}"
    store = RedisStore.from_url(one_node, staleness_seconds=0)
    placed = names_on_every_node(redis_cluster)
    permits = []
    for name in placed.values():
        cb = CircuitBreaker(name, store=store, failure_threshold=1, timeout_seconds=0.2,
                            half_open_max_calls=1)
        with pytest.raises(ProviderDown):
            cb.call(down)
        wait_server_time(store.client, 0.2)
        permits.append(cb.allow())
        assert permits[-1].is_probe

    for port, name in placed.items():
        keys = store.keys(name)
        node = redis_cluster.client(port)
        slots = {node.cluster("KEYSLOT", key) for key in keys}
        assert slots == {key_slot(name.encode())}
        # Both keys (the circuit and its probe lease) are there, and nothing of the slot
        # is anywhere else.
        assert node.exists(*keys) == 2
        for other in redis_cluster.ports:
            peer = redis_cluster.client(other)
            expected = 2 if other == port else 0
            assert peer.cluster("COUNTKEYSINSLOT", key_slot(name.encode())) == expected
            peer.close()
        node.close()
    for permit in permits:
        permit.success()
    store.client.close()


def test_names_and_snapshots_list_breakers_of_every_node_for_another_process(
    redis_cluster: ClusterTopology, cluster_url: str
) -> None:
    placed = names_on_every_node(redis_cluster)
    opened, forced, closed = sorted(placed.values())
    worker = BreakerRegistry(RedisStore.from_url(cluster_url))
    for _ in range(3):
        with pytest.raises(ProviderDown):
            worker.get(opened).call(down)
    worker.get(forced).force_open()
    with pytest.raises(ProviderDown):
        worker.get(closed).call(down)

    publisher = BreakerRegistry(RedisStore.from_url(cluster_url, staleness_seconds=0))
    snapshots = publisher.snapshots()

    assert publisher.names() == sorted(placed.values())
    assert json.loads(json.dumps(snapshots)) == snapshots
    assert [(s["name"], s["state"], s["failures"], s["store"]) for s in snapshots] == sorted(
        [(closed, "closed", 1, "redis"), (forced, "open", 0, "redis"), (opened, "open", 3, "redis")]
    )
    # The index is a key of its own, in a slot of its own, on the node that serves it.
    index_slot = key_slot(b"breaker:index")
    assert index_slot not in {key_slot(name.encode()) for name in placed.values()}
    index_node = redis_cluster.client(redis_cluster.node_of_slot(index_slot))
    assert sorted(n.decode() for n in index_node.zrange("breaker:index", 0, -1)) == sorted(
        placed.values()
    )
    index_node.close()
    with pytest.raises(CircuitBreakerOpenError):
        publisher.get(forced).call(up)


def test_state_published_through_the_cluster_client_reaches_subscribers_on_every_node(
    redis_cluster: ClusterTopology, cluster_url: str
) -> None:
    store = RedisStore.from_url(cluster_url)
    registry = BreakerRegistry(store)
    registry.get("payments.card").force_open()
    subscribers = []
    for port in redis_cluster.ports:
        pubsub = redis_cluster.client(port).pubsub()
        pubsub.subscribe("breaker:state")
        assert pubsub.get_message(timeout=2)["type"] == "subscribe"
        subscribers.append(pubsub)
    message = json.dumps({"published_at": time.time(), "breakers": registry.snapshots()})

    store.client.publish("breaker:state", message)

    for pubsub in subscribers:
        received = pubsub.get_message(timeout=5)
        assert received is not None, "a node's subscriber got nothing"
        assert json.loads(received["data"])["breakers"][0]["state"] == "open"
        pubsub.close()
    store.client.close()


def test_scripts_flushed_from_every_node_are_loaded_again_where_the_keys_live(
    redis_cluster: ClusterTopology, cluster_url: str
) -> None:
    store = RedisStore.from_url(cluster_url, staleness_seconds=0)
    placed = names_on_every_node(redis_cluster)
    breakers = [CircuitBreaker(name, store=store, failure_threshold=2) for name in placed.values()]
    for cb in breakers:
        assert cb.call(up) == "charged"
    for port in redis_cluster.ports:
        node = redis_cluster.client(port)
        node.script_flush()
        node.close()

    for cb in breakers:
        for _ in range(2):
            with pytest.raises(ProviderDown):
                cb.call(down)
        assert cb.state is OPEN

    for port in redis_cluster.ports:
        node = redis_cluster.client(port)
        assert node.script_exists(store.scripts["record"].sha) == [True]
        node.close()
    store.client.close()


def test_async_cluster_client_reads_the_circuit_a_sync_store_opened(cluster_url: str) -> None:
    store = RedisStore.from_url(cluster_url)
    CircuitBreaker("payments.card", store=store).force_open()

    async def read_state() -> CircuitState:
        client = async_client_from_url(cluster_url)
        assert isinstance(client, redis.asyncio.cluster.RedisCluster)
        breaker = AsyncCircuitBreaker("payments.card", store=AsyncRedisStore(client))
        state = await breaker.state()
        await client.aclose()
        return state

    assert asyncio.run(read_state()) is CircuitState.OPEN
    store.client.close()


def test_breakers_on_a_cluster_that_lost_its_nodes_run_on_the_fallback_and_never_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")
    with running(ClusterTopology(node_timeout_ms=500)) as cluster:
        placed = names_on_every_node(cluster)
        *survivors, lost = cluster.ports
        cluster.kill(lost)

        wait_until(lambda: all(cluster.cluster_state(port) == "fail" for port in survivors),
                   10.0, "the surviving nodes to declare the cluster down")
        store = RedisStore.from_url(cluster.url, staleness_seconds=0)
        for name in placed.values():
            began = time.monotonic()
            cb = CircuitBreaker(name, store=store, failure_threshold=1)
            assert cb.call(up) == "charged"
            with pytest.raises(ProviderDown):
                cb.call(down)
            assert cb.state is OPEN
            assert cb.snapshot()["store"] == "fallback"
            assert time.monotonic() - began < 1.0

        for port in survivors:
            cluster.kill(port)
        cb = CircuitBreaker("payments.other", store=store, failure_threshold=1)
        assert cb.call(up) == "charged"
        assert cb.snapshot()["store"] == "fallback"
        store.client.close()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("Circuit breaker store unreachable")
