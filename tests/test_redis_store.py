"""RedisStore on a real redis-server: key layout, TTLs, round trips, sharing and outages."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from redis.crc import key_slot

from breaker import CircuitBreaker, CircuitBreakerOpenError, CircuitState, RedisStore
from tests.dependencies import ProviderDown
from tests.redis_server import RedisServer
from tests.waiting import wait_until

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

NAME = "payments.card"
HASH_KEY = "breaker:{payments.card}"
PROBES_KEY = "breaker:{payments.card}:probes"



def down() -> str:
    raise ProviderDown


def up() -> str:
    return "charged"


def fail(cb: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ProviderDown):
            cb.call(down)



def server_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def wait_server_ms(client: redis.Redis, ms: int) -> None:
    target = server_ms(client) + ms + 1
    wait_until(lambda: server_ms(client) >= target, ms / 1000 + 10, "the server clock")


@contextlib.contextmanager
def commands_sent(url: str) -> Iterator[list[str]]:
    """Collect the names of the commands clients send while the block runs (MONITOR).

    Commands that scripts run on the server are left out: they cost no round trip.
    """
    sent: list[str] = []
    marker = f"end-of-block-{uuid.uuid4().hex}"
    watcher, marker_client = redis.Redis.from_url(url), redis.Redis.from_url(url)
    # Connected before MONITOR starts, so that its handshake is not counted.
    marker_client.ping()
    with watcher.monitor() as monitor:  # type: ignore[no-untyped-call]

        def read() -> None:
            for command in monitor.listen():
                if marker in command["command"]:
                    return
                if command["client_type"] != "lua":
                    sent.append(command["command"].split(" ", 1)[0].upper())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        yield sent
        marker_client.echo(marker)
        reader.join(timeout=10)
        assert not reader.is_alive(), "MONITOR never showed the end marker"
    watcher.close()
    marker_client.close()


@pytest.fixture
def stores(redis_url: str) -> Iterator[Callable[..., RedisStore]]:
    """Yield a factory of RedisStores, each standing for one worker process."""
    made: list[RedisStore] = []

    def make(**options: float) -> RedisStore:
        store = RedisStore.from_url(redis_url, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.client.close()


def breaker_on(store: RedisStore, **settings: float) -> CircuitBreaker:
    options: dict[str, float] = {
        "failure_threshold": 3, "timeout_seconds": 30.0, "success_threshold": 2,
        "half_open_max_calls": 2, **settings,
    }
    return CircuitBreaker(NAME, store=store, **options)  # type: ignore[arg-type]


# --- Data layout --------------------------------------------------------------------


def test_circuit_keys_share_one_cluster_slot_under_the_breaker_hash_tag(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    store = stores(staleness_seconds=0)
    cb = breaker_on(store, failure_threshold=1, timeout_seconds=0.05)
    fail(cb)
    wait_server_ms(redis_client, 50)
    probe = cb.allow()

    assert store.keys(NAME) == [HASH_KEY, PROBES_KEY]
    keys = set(redis_client.keys("breaker:*"))
    assert keys >= {HASH_KEY.encode(), PROBES_KEY.encode()}
    assert key_slot(HASH_KEY.encode()) == key_slot(PROBES_KEY.encode())
    assert key_slot(HASH_KEY.encode()) == key_slot(NAME.encode())
    probe.release()


def test_circuit_hash_has_a_ttl_from_its_first_write(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    cb = breaker_on(stores(key_ttl_seconds=3600))

    cb.call(up)

    assert 0 < redis_client.pttl(HASH_KEY) <= 3_600_000


def test_circuit_hash_created_by_a_read_still_expires(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    cb = breaker_on(stores(key_ttl_seconds=3600))

    assert cb.state is CLOSED
    cb.snapshot()

    assert 0 < redis_client.pttl(HASH_KEY) <= 3_600_000


def test_probe_lease_set_has_a_ttl_while_a_probe_is_held(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    cb = breaker_on(stores(staleness_seconds=0), failure_threshold=1, timeout_seconds=0.05)
    fail(cb)
    wait_server_ms(redis_client, 50)

    probe = cb.allow()

    assert probe.is_probe
    assert redis_client.zcard(PROBES_KEY) == 1
    assert redis_client.pttl(PROBES_KEY) > 0
    probe.success()
    assert redis_client.zcard(PROBES_KEY) == 0


def test_timestamps_come_from_the_redis_server_clock(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    cb = breaker_on(stores(staleness_seconds=0), failure_threshold=1)
    before = server_ms(redis_client)
    fail(cb)
    after = server_ms(redis_client)

    opened_ms = int(redis_client.hget(HASH_KEY, "opened_at") or 0)

    assert before <= opened_ms <= after
    assert cb.snapshot()["opened_at"] == round(opened_ms / 1000, 3)


def test_result_admitted_before_the_keys_expired_does_not_count_after(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    cb = breaker_on(stores(staleness_seconds=0), failure_threshold=1)
    stale = cb.allow()
    redis_client.delete(HASH_KEY, PROBES_KEY)
    wait_server_ms(redis_client, 1)

    stale.failure(ProviderDown())

    assert cb.state is CLOSED
    assert cb.snapshot()["failures"] == 1


# --- Round trips --------------------------------------------------------------------


def test_healthy_calls_on_a_closed_circuit_send_no_command_yet_every_success_is_counted(
    stores: Callable[..., RedisStore], redis_url: str
) -> None:
    # A long cache, so that a slow machine cannot make the batch due inside the block.
    cb = breaker_on(stores(staleness_seconds=5.0))
    cb.call(up)

    with commands_sent(redis_url) as sent:
        for _ in range(300):
            cb.call(up)

    assert sent == []
    assert cb.snapshot()["calls"] == 301


def test_open_circuit_rejects_almost_without_commands_and_still_counts_rejections(
    stores: Callable[..., RedisStore], redis_url: str
) -> None:
    cb = breaker_on(stores())
    cb.force_open()

    with commands_sent(redis_url) as sent:
        for _ in range(1000):
            with pytest.raises(CircuitBreakerOpenError):
                cb.call(up)

    # A process asks the server again once its cached answer is a second old.
    assert len(sent) <= 10
    assert cb.snapshot()["rejected"] == 1000


def test_cached_rejection_reports_a_shrinking_retry_after(
    stores: Callable[..., RedisStore],
) -> None:
    cb = breaker_on(stores())
    cb.force_open()

    retries = []
    for _ in range(3):
        with pytest.raises(CircuitBreakerOpenError) as caught:
            cb.call(up)
        retries.append(caught.value.retry_after)

    assert all(0 < retry <= 30.0 for retry in retries)
    assert retries == sorted(retries, reverse=True)


def test_operator_reset_from_another_process_reaches_a_cached_process_within_staleness(
    stores: Callable[..., RedisStore],
) -> None:
    worker = breaker_on(stores(staleness_seconds=0.5))
    operator = breaker_on(stores())
    worker.force_open()
    with pytest.raises(CircuitBreakerOpenError):
        worker.call(up)

    operator.reset()

    def admitted() -> bool:
        try:
            worker.call(up)
        except CircuitBreakerOpenError:
            return False
        return True

    wait_until(admitted, 0.5 + 2.0, "the worker to see the operator's reset")
    assert worker.state is CLOSED


def test_failure_after_cached_success_is_counted_on_the_server(
    stores: Callable[..., RedisStore],
) -> None:
    cb = breaker_on(stores(), failure_threshold=2)
    cb.call(up)

    fail(cb, 2)

    assert cb.state is OPEN
    with pytest.raises(CircuitBreakerOpenError):
        cb.call(up)


def test_success_after_a_failure_is_sent_at_once_and_clears_the_count_for_everyone(
    stores: Callable[..., RedisStore], redis_url: str
) -> None:
    cb = breaker_on(stores())
    observer = breaker_on(stores(staleness_seconds=0))
    fail(cb)
    assert observer.failure_count == 1

    with commands_sent(redis_url) as sent:
        cb.call(up)

    assert sent == ["EVALSHA", "EVALSHA"]
    assert observer.failure_count == 0


def test_a_process_that_stops_calling_sends_its_successes_within_staleness(
    stores: Callable[..., RedisStore],
) -> None:
    worker = breaker_on(stores(staleness_seconds=0.3))
    observer = breaker_on(stores(staleness_seconds=0))

    for _ in range(10):
        worker.call(up)

    wait_until(lambda: observer.snapshot()["calls"] == 10, 0.3 + 2.0,
               "the idle worker's batched successes to reach Redis")
    assert observer.snapshot()["successes"] == 10


def _child_calls_and_flushes(store: RedisStore, cb: CircuitBreaker) -> None:
    for _ in range(3):
        cb.call(up)
    store.flush()


def test_a_forked_child_does_not_send_its_parents_batch_again(
    stores: Callable[..., RedisStore],
) -> None:
    store = stores(staleness_seconds=5.0)
    cb = breaker_on(store)
    for _ in range(5):
        cb.call(up)

    child = multiprocessing.get_context("fork").Process(
        target=_child_calls_and_flushes, args=(store, cb)
    )
    child.start()
    child.join(timeout=30)
    store.flush()

    assert child.exitcode == 0
    assert cb.snapshot()["calls"] == 5 + 3


def test_counts_batched_before_the_keys_were_deleted_do_not_bring_the_circuit_back(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    store = stores(staleness_seconds=5.0)
    cb = breaker_on(store)
    for _ in range(5):
        cb.call(up)
    redis_client.delete(HASH_KEY)

    store.flush()

    assert not redis_client.exists(HASH_KEY)
    assert cb.snapshot()["calls"] == 0


def test_window_key_shares_the_circuits_slot_and_expires(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    store = stores(staleness_seconds=0, key_ttl_seconds=3600)
    cb = CircuitBreaker(NAME, store=store, failure_rate_threshold=0.5)
    fail(cb)

    window_key = store.window_key(NAME)
    assert window_key == "breaker:{payments.card}:window"
    assert key_slot(window_key.encode()) == key_slot(HASH_KEY.encode())
    assert 0 < redis_client.pttl(window_key) <= 3_600_000


# --- One circuit shared by every process -------------------------------------------


def test_failures_from_different_processes_add_up_to_one_threshold(
    stores: Callable[..., RedisStore],
) -> None:
    first, second, third = (breaker_on(stores()) for _ in range(3))

    fail(first)
    fail(second)
    fail(third)

    for cb in (first, second, third):
        assert cb.state is OPEN
    assert first.snapshot()["failures"] == 3


def test_half_open_probe_limit_holds_across_processes(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    workers = [breaker_on(stores(), failure_threshold=1, timeout_seconds=0.05)
               for _ in range(4)]
    fail(workers[0])
    wait_server_ms(redis_client, 50)

    admitted, refused = [], []
    for cb in workers:
        try:
            admitted.append(cb.allow())
        except CircuitBreakerOpenError as error:
            refused.append(error.state)
    assert len(admitted) == 2
    assert refused == [HALF_OPEN, HALF_OPEN]
    assert all(permit.is_probe for permit in admitted)

    for permit in admitted:
        permit.success()
    for cb in workers:
        assert cb.state is CLOSED


def test_process_refused_a_probe_slot_asks_again_soon_but_is_told_the_servers_wait(
    stores: Callable[..., RedisStore], redis_client: redis.Redis
) -> None:
    # Default staleness (1 s): the refused process keeps its cache, yet must not refuse from
    # it for the whole second once the probes have closed the circuit.
    prober = breaker_on(stores(), failure_threshold=1, timeout_seconds=2.0)
    fail(prober)
    wait_server_ms(redis_client, 2000)
    probes = [prober.allow(), prober.allow()]
    waiter = breaker_on(stores(), failure_threshold=1, timeout_seconds=2.0)

    with pytest.raises(CircuitBreakerOpenError) as refused:
        waiter.allow()
    assert refused.value.state is HALF_OPEN
    assert refused.value.retry_after == pytest.approx(1.0, abs=0.05)
    with pytest.raises(CircuitBreakerOpenError) as refused_from_cache:
        waiter.allow()
    assert 0.5 < refused_from_cache.value.retry_after <= 1.0

    for permit in probes:
        permit.success()
    # Well inside the 1 s a cached refusal used to last.
    wait_until(lambda: _admits(waiter), 0.8, "the waiting process to see the circuit closed")


def _admits(cb: CircuitBreaker) -> bool:
    try:
        cb.allow().release()
    except CircuitBreakerOpenError:
        return False
    return True


def test_transition_is_logged_once_by_the_process_that_made_it(
    stores: Callable[..., RedisStore],
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="breaker")
    workers = [breaker_on(stores(staleness_seconds=0), timeout_seconds=0.05) for _ in range(3)]

    for cb in workers:
        fail(cb)
    for cb in workers:
        with pytest.raises(CircuitBreakerOpenError):
            cb.call(up)
    wait_server_ms(redis_client, 50)
    for cb in workers:
        assert cb.state is HALF_OPEN
    for cb in workers:
        cb.call(up)

    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        f"Circuit breaker {NAME} opened after 3 failures",
        f"Circuit breaker {NAME} entering half-open state",
        f"Circuit breaker {NAME} closed after successful recovery",
    ]


# --- Redis unreachable ---------------------------------------------------------------


def test_breaker_survives_a_redis_restart_with_one_warning_and_resumes_shared_state(
    spare_redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="breaker")
    url = spare_redis_server.url
    store = RedisStore.from_url(url, reconnect_interval=0.1)
    cb = breaker_on(store, timeout_seconds=0.2)
    cb.call(up)

    spare_redis_server.stop()

    # Several reconnect intervals of traffic: each retry of Redis fails again.
    outcomes: dict[str, int] = {"charged": 0, "failed": 0, "rejected": 0}
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        for fn in (up, down, down, down):
            try:
                cb.call(fn)
                outcomes["charged"] += 1
            except ProviderDown:
                outcomes["failed"] += 1
            except CircuitBreakerOpenError:
                outcomes["rejected"] += 1
        assert cb.state in (CLOSED, OPEN, HALF_OPEN)
        assert cb.snapshot()["store"] == "fallback"
        time.sleep(0.01)
    # The per-process fallback still protected the dependency.
    assert outcomes["rejected"] > 0
    assert outcomes["charged"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("Circuit breaker store unreachable")

    spare_redis_server.start()

    def shared_again() -> bool:
        with contextlib.suppress(CircuitBreakerOpenError):
            cb.call(up)
        return bool(cb.snapshot()["store"] == "redis")

    wait_until(shared_again, 5.0, "the breaker to use Redis again")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[1].startswith("Circuit breaker store reachable again")
    other_process = RedisStore.from_url(url)
    observer = breaker_on(other_process)
    cb.reset()
    fail(cb, 3)
    assert observer.state is OPEN
    other_process.client.close()
    store.client.close()


def test_breaker_works_from_the_fallback_when_redis_is_down_from_the_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")
    with RedisServer() as server:
        url = server.url
    store = RedisStore.from_url(url, reconnect_interval=0.05)
    cb = breaker_on(store, failure_threshold=2)

    assert cb.call(up) == "charged"
    fail(cb, 2)
    with pytest.raises(CircuitBreakerOpenError):
        cb.call(up)

    assert cb.state is OPEN
    assert cb.snapshot()["store"] == "fallback"
    assert [r.getMessage()[:33] for r in caplog.records] == ["Circuit breaker store unreachable"]
    store.client.close()
