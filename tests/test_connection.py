"""breaker.connection without servers: URL forms, the clients they make, masked passwords."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from breaker import RedisStore
from breaker.connection import (
    AsyncMasterFollowingPool,
    MasterFollowingPool,
    RedisTarget,
    async_client_from_url,
    client_from_url,
    parse_url,
    safe_url,
)

SECRET = "s3cr3t"


# --- Parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6380/2", RedisTarget("redis", (("127.0.0.1", 6380),), db=2)),
        ("redis://cache", RedisTarget("redis", (("cache", 6379),))),
        ("rediss://:pw@cache:6390/0",
         RedisTarget("redis", (("cache", 6390),), ssl=True, password="pw")),
        ("unix:///run/redis.sock?db=1", RedisTarget("redis", (), db=1)),
        ("redis://h:6379/1?db=5", RedisTarget("redis", (("h", 6379),), db=5)),
        ("sentinel://s1:26380",
         RedisTarget("sentinel", (("s1", 26380),))),
        ("sentinel://s1;sentinel://s2:26380;sentinel://[::1]:26381/3",
         RedisTarget("sentinel", (("s1", 26379), ("s2", 26380), ("::1", 26381)), db=3)),
        ("sentinel://s1:1/2;sentinel://s2:2",
         RedisTarget("sentinel", (("s1", 1), ("s2", 2)), db=2)),
        ("sentinel://:pw@s1:1/4;sentinel://:pw@s2:2",
         RedisTarget("sentinel", (("s1", 1), ("s2", 2)), db=4, password="pw")),
        ("sentinel://app:p%40ss@s1:1/0",
         RedisTarget("sentinel", (("s1", 1),), username="app", password="p@ss")),
        ("redis+cluster://n1:7000",
         RedisTarget("cluster", (("n1", 7000),))),
        ("redis+cluster://u:pw@n1:7000,n2,10.0.0.3:7002/0",
         RedisTarget("cluster", (("n1", 7000), ("n2", 6379), ("10.0.0.3", 7002)),
                     username="u", password="pw")),
        ("rediss+cluster://n1:7000", RedisTarget("cluster", (("n1", 7000),), ssl=True)),
    ],
)
def test_url_forms_parse_to_their_target(url: str, expected: RedisTarget) -> None:
    target = parse_url(url)

    assert target == expected
    assert target.password == expected.password


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        (None, "must be a string"),
        ("", "must start with one of"),
        ("127.0.0.1:6379", "must start with one of"),
        (f"http://:{SECRET}@127.0.0.1:6379/0", "must start with one of"),
        (f"amqp://guest:{SECRET}@localhost//", "must start with one of"),
        (f"redis://:{SECRET}@host:port/0", "bad host or port"),
        (f"redis://:{SECRET}@host:99999/0", "bad host or port"),
        (f"redis://:{SECRET}@/0", "needs a host"),
        (f"redis://:{SECRET}@host/zero", "db must be a number"),
        (f"redis://:{SECRET}@host/0?db=x", "db must be a number"),
        ("unix://", "needs a path"),
        (f"sentinel://:{SECRET}@s1:1;redis://s2:2", "part 2 must be sentinel"),
        (f"sentinel://:{SECRET}@s1:1;sentinel://:other@s2:2", "different user names or passw"),
        (f"sentinel://:{SECRET}@s1:1/1;sentinel://s2:2/2", "different dbs"),
        (f"sentinel://:{SECRET}@s1:1?master_name=m", "no query"),
        (f"sentinel://:{SECRET}@:1", "needs a sentinel host"),
        (f"sentinel://:{SECRET}@s1:x1", "bad host or port"),
        (f"redis+cluster://:{SECRET}@n1:7000/1", "only db 0"),
        (f"redis+cluster://:{SECRET}@n1:7000,:7001", "without a host"),
        (f"redis+cluster://:{SECRET}@n1:7000?ssl=true", "no query"),
        (f"redis+cluster://:{SECRET}@n1:70x0", "bad host or port"),
    ],
)
def test_bad_url_raises_value_error_naming_the_problem_without_the_password(
    url: Any, complaint: str
) -> None:
    with pytest.raises(ValueError, match=r"\burl\b") as caught:
        parse_url(url)

    assert complaint in str(caught.value)
    assert SECRET not in str(caught.value)


def test_bad_url_given_to_the_store_or_a_client_raises_value_error_without_the_password() -> None:
    url = f"sentinel://:{SECRET}@s1:1;http://s2:2"
    for make in (RedisStore.from_url, client_from_url, async_client_from_url):
        with pytest.raises(ValueError, match="part 2") as caught:
            make(url, master_name="m")
        assert SECRET not in str(caught.value)


def test_target_repr_shows_no_password() -> None:
    assert SECRET not in repr(parse_url(f"sentinel://:{SECRET}@s1:1"))


# --- Masking ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"rediss://app:{SECRET}@h:6379/0", "rediss://app:***@h:6379/0"),
        ("redis://app@h:6379/0", "redis://app@h:6379/0"),
        (f"redis://:{SECRET}@h:6379/0?password={SECRET}&db=1",
         "redis://:***@h:6379/0?password=***&db=1"),
        (f"unix:///run/redis.sock?db=0&password={SECRET}",
         "unix:///run/redis.sock?db=0&password=***"),
        (f"sentinel://:{SECRET}@s1:1;sentinel://:{SECRET}@s2:2;sentinel://s3:3/0",
         "sentinel://:***@s1:1;sentinel://:***@s2:2;sentinel://s3:3/0"),
        (f"redis+cluster://u:{SECRET}@n1:7000,n2:7001", "redis+cluster://u:***@n1:7000,n2:7001"),
        # Unencoded '@', '/' and ';' inside a password are masked with it.
        ("redis://:p@ss/w;rd@h:6379/0", "redis://:***@h:6379/0"),
        ("sentinel://:a;b@s1:1;sentinel://:a;b@s2:2",
         "sentinel://:***@s1:1;sentinel://:***@s2:2"),
    ],
)
def test_safe_url_masks_every_password(url: str, masked: str) -> None:
    assert safe_url(url) == masked


def test_safe_url_of_something_that_is_not_a_string_names_only_its_type() -> None:
    assert safe_url(None) == "<NoneType>"
    assert safe_url(b"redis://:x@h") == "<bytes>"


# --- The clients made (no command is sent) ------------------------------------------


def test_redis_url_gives_a_client_with_short_timeouts_and_one_quick_retry() -> None:
    client = client_from_url("redis://127.0.0.1:6380/2")
    kwargs = client.connection_pool.connection_kwargs

    assert isinstance(client, redis.Redis)
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6380, 2)
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (1.0, 1.0)
    assert kwargs["health_check_interval"] == 30
    assert kwargs["retry"].get_retries() == 1
    client.close()


def test_options_override_the_defaults() -> None:
    client = client_from_url("redis://127.0.0.1:6380/0", socket_timeout=5.0, client_name="x")

    assert client.connection_pool.connection_kwargs["socket_timeout"] == 5.0
    assert client.connection_pool.connection_kwargs["client_name"] == "x"
    client.close()


def test_sentinel_url_gives_a_master_client_that_follows_the_sentinels() -> None:
    client = client_from_url(
        "sentinel://:pw@s1:1;sentinel://s2:2/3", master_name="pb-master",
        sentinel_kwargs={"password": "sentinel-pw"},
    )
    pool = client.connection_pool

    assert isinstance(client, redis.Redis)
    assert isinstance(pool, MasterFollowingPool)
    assert pool.service_name == "pb-master"
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (3, "pw")
    assert pool.connection_kwargs["socket_timeout"] == 1.0
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [1, 2]
    for sentinel in sentinels:
        sentinel_kwargs = sentinel.connection_pool.connection_kwargs
        # The URL's password is the master's; the sentinels' comes from sentinel_kwargs.
        assert sentinel_kwargs["password"] == "sentinel-pw"
        assert sentinel_kwargs["socket_timeout"] == 1.0
        assert sentinel_kwargs["retry"].get_retries() == 0
    RedisStore(client)
    client.close()


def test_sentinel_kwargs_that_are_not_a_dict_raise_value_error_naming_only_their_type() -> None:
    with pytest.raises(ValueError, match=r"\bsentinel_kwargs\b.*got str") as caught:
        client_from_url("sentinel://s1:1", master_name="m", sentinel_kwargs=SECRET)  # type: ignore[arg-type]

    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("master_name", [None, "", 3])
def test_sentinel_url_without_a_master_name_raises_value_error_naming_it(
    master_name: Any,
) -> None:
    for make in (client_from_url, async_client_from_url, RedisStore.from_url):
        with pytest.raises(ValueError, match=r"\bmaster_name\b"):
            make(f"sentinel://:{SECRET}@s1:1", master_name=master_name)


def test_master_name_is_ignored_by_urls_of_one_server() -> None:
    client = client_from_url("redis://127.0.0.1:6380/0", master_name="pb-master")

    assert isinstance(client, redis.Redis)
    client.close()


def test_async_clients_are_made_for_every_form_without_connecting() -> None:
    async def make_and_close() -> list[Any]:
        made = [
            async_client_from_url("redis://127.0.0.1:1/0"),
            async_client_from_url("sentinel://127.0.0.1:1", master_name="pb-master"),
        ]
        kinds = [type(client) for client in made]
        kinds.append(type(made[1].connection_pool))
        for client in made:
            await client.aclose()
        return kinds

    kinds = asyncio.run(make_and_close())

    assert kinds == [redis.asyncio.Redis, redis.asyncio.Redis, AsyncMasterFollowingPool]


def test_store_refuses_a_client_of_another_kind_naming_its_type() -> None:
    with pytest.raises(ValueError, match=r"\bclient\b.*got str"):
        RedisStore("redis://127.0.0.1:6379/0")  # type: ignore[arg-type]
    sentinel_manager = redis.sentinel.Sentinel([("127.0.0.1", 1)])
    with pytest.raises(ValueError, match="got Sentinel"):
        RedisStore(sentinel_manager)  # type: ignore[arg-type]
