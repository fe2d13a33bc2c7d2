"""Bad configuration fails at construction with a ValueError that names what is wrong."""

from __future__ import annotations

import math
import re
import time
from typing import Any

import pytest
import redis

from breaker import BreakerConfig, BreakerRegistry, CircuitBreaker, MemoryStore, RedisStore
from breaker.registry import validate_overrides

BAD_COUNTS: list[Any] = [0, -1, 1.5, True, "3", None]
BAD_DURATIONS: list[Any] = [0, -1, math.nan, math.inf, -math.inf, "30", True]


def names(parameter: str) -> str:
    return rf"\b{re.escape(parameter)}\b"


@pytest.mark.parametrize("value", BAD_COUNTS)
@pytest.mark.parametrize(
    "parameter", ["failure_threshold", "success_threshold", "half_open_max_calls"]
)
def test_invalid_count_raises_value_error_naming_it(parameter: str, value: Any) -> None:
    with pytest.raises(ValueError, match=names(parameter)):
        CircuitBreaker("payments.card", **{parameter: value})


@pytest.mark.parametrize("value", [*BAD_DURATIONS, None])
def test_invalid_timeout_raises_value_error_naming_it(value: Any) -> None:
    with pytest.raises(ValueError, match=names("timeout_seconds")):
        CircuitBreaker("payments.card", timeout_seconds=value)


@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_invalid_probe_lease_raises_value_error_naming_it(value: Any) -> None:
    # None is valid here: the lease then lasts one timeout.
    with pytest.raises(ValueError, match=names("probe_lease_seconds")):
        CircuitBreaker("payments.card", probe_lease_seconds=value)


@pytest.mark.parametrize(
    "name", ["", " ", "payments card", "payments.{card}", "tab\there", "x" * 201, 7, None]
)
def test_invalid_name_raises_value_error_naming_it(name: Any) -> None:
    with pytest.raises(ValueError, match=names("name")):
        CircuitBreaker(name)


@pytest.mark.parametrize("is_failure", [42, "yes", True])
def test_is_failure_that_is_not_callable_raises_value_error(is_failure: Any) -> None:
    with pytest.raises(ValueError, match=names("is_failure")):
        CircuitBreaker("payments.card", is_failure=is_failure)


@pytest.mark.parametrize("store", [object(), "redis://127.0.0.1:6379/0", 0])
def test_store_that_is_not_a_store_raises_value_error(store: Any) -> None:
    with pytest.raises(ValueError, match=names("store")):
        CircuitBreaker("payments.card", store=store)


def test_redis_client_passed_as_store_raises_value_error(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(ValueError, match=names("store")):
        CircuitBreaker("payments.card", store=client)  # type: ignore[arg-type]
    client.close()


def test_clock_that_is_not_callable_raises_value_error() -> None:
    with pytest.raises(ValueError, match=names("clock")):
        CircuitBreaker("payments.card", clock=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=names("clock")):
        MemoryStore(clock=1.0)  # type: ignore[arg-type]


def test_clock_with_redis_store_raises_value_error(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)

    with pytest.raises(ValueError, match=names("clock")):
        CircuitBreaker("payments.card", store=store, clock=time.monotonic)
    store.client.close()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379/0", "127.0.0.1:6379", "amqp://guest@localhost//", "", None]
)
def test_redis_store_from_a_non_redis_url_raises_value_error(url: Any) -> None:
    with pytest.raises(ValueError, match=names("url")):
        RedisStore.from_url(url)


@pytest.mark.parametrize(
    ("parameter", "value"),
    [
        ("staleness_seconds", -1),
        ("staleness_seconds", "1"),
        ("key_ttl_seconds", 0),
        ("reconnect_interval", -0.5),
        ("prefix", ""),
        ("prefix", "breaker{x}"),
    ],
)
def test_invalid_redis_store_option_raises_value_error_naming_it(
    redis_url: str, parameter: str, value: Any
) -> None:
    with pytest.raises(ValueError, match=names(parameter)):
        RedisStore.from_url(redis_url, **{parameter: value})


def test_redis_store_of_something_other_than_a_client_raises_value_error() -> None:
    with pytest.raises(ValueError, match=names("client")):
        RedisStore("redis://127.0.0.1:6379/0")  # type: ignore[arg-type]


def test_smallest_valid_settings_are_accepted() -> None:
    cb = CircuitBreaker(
        "p", failure_threshold=1, timeout_seconds=1, success_threshold=1,
        half_open_max_calls=1, probe_lease_seconds=0.001,
    )

    assert cb.config.timeout_seconds == 1.0
    assert isinstance(cb.config.timeout_seconds, float)
    assert cb.config.lease_seconds == 0.001


def test_probe_lease_defaults_to_the_timeout() -> None:
    assert BreakerConfig(timeout_seconds=12).lease_seconds == 12.0


# --- Registry overrides -------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"timeot": 5}, "timeot"),
        ({"timeout_seconds": 5}, "timeout_seconds"),
        ({"failure_threshold": 3, "threshold": 2}, "threshold"),
    ],
)
def test_override_with_an_unknown_key_names_the_breaker_and_the_key(
    settings: dict[str, Any], key: str
) -> None:
    with pytest.raises(ValueError, match=names(key)) as caught:
        validate_overrides({"payments.paypal": settings}, BreakerConfig())
    assert "payments.paypal" in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("timeout", 0),
        ("timeout", "abc"),
        ("timeout", math.nan),
        ("failure_threshold", 0),
        ("failure_threshold", 2.5),
        ("success_threshold", -1),
        ("half_open_max_calls", 0),
        ("probe_lease", -1),
    ],
)
def test_override_with_a_bad_value_names_the_breaker_and_the_key(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=re.escape(key)) as caught:
        validate_overrides({"payments.paypal": {key: value}}, BreakerConfig())
    assert "payments.paypal" in str(caught.value)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"bad name": {}}, "bad name"),
        ({"payments.paypal": 60}, "payments.paypal"),
        (["payments.paypal"], "breaker_overrides"),
    ],
)
def test_malformed_overrides_name_the_bad_entry(overrides: Any, named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        validate_overrides(overrides, BreakerConfig())


def test_registry_rejects_bad_overrides_at_construction() -> None:
    with pytest.raises(ValueError, match=re.escape("payments.paypal")) as caught:
        BreakerRegistry(MemoryStore(), overrides={"payments.paypal": {"timeout": -5}})
    assert "timeout" in str(caught.value)


def test_registry_builds_each_breaker_with_its_overrides_over_the_defaults() -> None:
    registry = BreakerRegistry(
        MemoryStore(),
        defaults=BreakerConfig(failure_threshold=5, timeout_seconds=10),
        overrides={"payments.paypal": {"timeout": 60, "probe_lease": 2}},
    )

    paypal, card = registry.get("payments.paypal"), registry.get("payments.card")

    assert paypal.config == BreakerConfig(
        failure_threshold=5, timeout_seconds=60, probe_lease_seconds=2
    )
    assert card.config == BreakerConfig(failure_threshold=5, timeout_seconds=10)
    assert registry.get("payments.paypal") is paypal
    assert registry.names() == ["payments.card", "payments.paypal"]


def test_registry_refuses_an_invalid_breaker_name() -> None:
    registry = BreakerRegistry(MemoryStore())

    with pytest.raises(ValueError, match=names("name")):
        registry.get("payments card")


# --- Policies beyond ADR-003 ------------------------------------------------------------

BAD_SHARES: list[Any] = [0, -0.1, 1.5, math.nan, "0.5", True]


@pytest.mark.parametrize("value", [0.5, 0.99, -1, math.inf, math.nan, "2", True])
def test_invalid_open_backoff_raises_value_error_naming_it(value: Any) -> None:
    with pytest.raises(ValueError, match=names("open_backoff")):
        CircuitBreaker("payments.card", open_backoff=value)


@pytest.mark.parametrize("value", [*BAD_DURATIONS, 29.9])
def test_invalid_max_timeout_raises_value_error_naming_it(value: Any) -> None:
    # 29.9: shorter than the 30 s timeout it must cap.
    with pytest.raises(ValueError, match=names("max_timeout_seconds")):
        CircuitBreaker("payments.card", timeout_seconds=30, max_timeout_seconds=value)


@pytest.mark.parametrize("value", BAD_SHARES)
@pytest.mark.parametrize("parameter", ["failure_rate_threshold", "slow_call_rate_threshold"])
def test_invalid_rate_threshold_raises_value_error_naming_it(parameter: str, value: Any) -> None:
    with pytest.raises(ValueError, match=names(parameter)):
        CircuitBreaker("payments.card", slow_call_seconds=1.0, **{parameter: value})


@pytest.mark.parametrize("parameter", ["window_seconds", "slow_call_seconds"])
@pytest.mark.parametrize("value", BAD_DURATIONS)
def test_invalid_policy_duration_raises_value_error_naming_it(parameter: str, value: Any) -> None:
    with pytest.raises(ValueError, match=names(parameter)):
        CircuitBreaker("payments.card", **{parameter: value})


@pytest.mark.parametrize("value", BAD_COUNTS)
def test_invalid_minimum_calls_raises_value_error_naming_it(value: Any) -> None:
    with pytest.raises(ValueError, match=names("minimum_calls")):
        CircuitBreaker("payments.card", minimum_calls=value)


def test_slow_call_rate_without_slow_call_seconds_raises_value_error() -> None:
    with pytest.raises(ValueError, match=names("slow_call_seconds")):
        CircuitBreaker("payments.card", slow_call_rate_threshold=0.5)


def test_policies_are_off_by_default_and_reported_with_their_effective_values() -> None:
    config = CircuitBreaker("payments.card", timeout_seconds=20).config

    assert (config.open_backoff, config.max_open_seconds) == (1.0, 200.0)
    assert not config.windowed
    assert config.slow_rate is None
    assert config.as_dict() == {
        "failure_threshold": 3, "timeout_seconds": 20.0, "success_threshold": 2,
        "half_open_max_calls": 2, "probe_lease_seconds": 20.0, "open_backoff": 1.0,
        "max_timeout_seconds": 200.0, "failure_rate_threshold": None, "window_seconds": 30.0,
        "minimum_calls": 10, "slow_call_seconds": None, "slow_call_rate_threshold": None,
    }
    slow = BreakerConfig(slow_call_seconds=2)
    assert (slow.windowed, slow.slow_rate) == (True, 1.0)


def test_open_duration_grows_by_the_backoff_and_stops_at_the_cap() -> None:
    config = BreakerConfig(timeout_seconds=10, open_backoff=3, max_timeout_seconds=100)

    assert [config.open_seconds(n) for n in range(5)] == [10.0, 30.0, 90.0, 100.0, 100.0]
    # Far past any float: the cap, not an overflow.
    assert config.open_seconds(100_000) == 100.0


def test_registry_reads_policy_overrides_with_their_setting_names() -> None:
    registry = BreakerRegistry(
        MemoryStore(),
        defaults=BreakerConfig(timeout_seconds=10, open_backoff=2),
        overrides={"payments.paypal": {
            "max_timeout": 120, "failure_rate_threshold": 0.5, "window": 60,
            "minimum_calls": 20, "slow_call_seconds": 3, "slow_call_rate_threshold": 0.8,
            "timeout": 40,
        }},
    )

    paypal = registry.get("payments.paypal")

    assert paypal.config == BreakerConfig(
        timeout_seconds=40, open_backoff=2, max_timeout_seconds=120,
        failure_rate_threshold=0.5, window_seconds=60, minimum_calls=20,
        slow_call_seconds=3, slow_call_rate_threshold=0.8,
    )
    assert registry.get("payments.card").config == BreakerConfig(timeout_seconds=10, open_backoff=2)


@pytest.mark.parametrize(
    ("key", "settings"),
    [
        ("open_backoff", {"open_backoff": 0.5}),
        ("max_timeout", {"max_timeout": 1}),
        ("failure_rate_threshold", {"failure_rate_threshold": 2}),
        ("window", {"window": 0}),
        ("minimum_calls", {"minimum_calls": 0}),
        ("slow_call_seconds", {"slow_call_seconds": -1}),
        ("slow_call_rate_threshold", {"slow_call_seconds": 1, "slow_call_rate_threshold": 0}),
    ],
)
def test_policy_override_with_a_bad_value_names_the_breaker_and_the_key(
    key: str, settings: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=re.escape(key)) as caught:
        validate_overrides({"payments.paypal": settings}, BreakerConfig())
    assert "payments.paypal" in str(caught.value)


def test_override_of_the_timeout_above_the_default_cap_is_accepted() -> None:
    # The default cap follows each breaker's own timeout (10 x), not the defaults'.
    configs = validate_overrides({"payments.paypal": {"timeout": 600}}, BreakerConfig())

    assert configs["payments.paypal"].max_open_seconds == 6000.0
