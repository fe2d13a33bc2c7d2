"""Turn a breaker Redis URL into a redis-py client: one server, a Sentinel master or a Cluster.

RedisStore.from_url and the workers build their clients here; docs/design.md ("Sentinel and
Cluster") shows the URL forms and what a client does during a failover.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

# A breaker must give up on Redis within about a second and fall back, not hang on
# redis-py's default timeouts. Any of these can be overridden by a keyword argument.
DEFAULT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 1.0,
    "socket_connect_timeout": 1.0,
    "health_check_interval": 30,
}

SENTINEL_PORT = 26379
REDIS_PORT = 6379

# How often a Sentinel master client asks the sentinels which server is the master: the
# store's own staleness bound, so a failover reaches a process as fast as any other change.
MASTER_CHECK_SECONDS = 1.0

SINGLE_SCHEMES = ("redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SCHEMES = (*SINGLE_SCHEMES, "sentinel", *CLUSTER_SCHEMES)

# Parts of a sentinel:// URL are separated by ';', but only where the next part starts with
# a scheme, so a ';' inside a password does not cut it in two.
_PART_SEPARATOR = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")
# Greedy up to the last '@' of a part: a password may hold '@' or '/' unencoded.
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>.*)@", re.DOTALL)
_QUERY_PASSWORD = re.compile(r"(?i)([?&][a-z_]*password=)[^&#]*")

Kind = Literal["redis", "sentinel", "cluster"]


@dataclass(frozen=True)
class RedisTarget:
    """Where a breaker Redis URL points, checked before any connection is made."""

    kind: Kind
    # Sentinels (kind "sentinel"), nodes to start from (kind "cluster"), the server itself
    # (kind "redis" over TCP), or nothing (a unix socket).
    addresses: tuple[tuple[str, int], ...]
    db: int = 0
    ssl: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def safe_url(url: object) -> str:
    """Return url with every password in it (each sentinel part too) replaced by ***."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    return ";".join(_mask_part(part) for part in _PART_SEPARATOR.split(url))


def parse_url(url: object) -> RedisTarget:
    """Return where url points, or raise ValueError saying what is wrong (never a password)."""
    if not isinstance(url, str):
        raise ValueError(f"url must be a string such as redis://host:6379/0, got {safe_url(url)}")
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme not in SCHEMES:
        raise ValueError(
            "url must start with one of "
            f"{', '.join(s + '://' for s in SCHEMES)}, got {safe_url(url)!r}"
        )
    if scheme == "sentinel":
        return _parse_sentinel(url)
    if scheme in CLUSTER_SCHEMES:
        return _parse_cluster(url, ssl=scheme == "rediss+cluster")
    return _parse_single(url, scheme)


def client_from_url(
    url: str,
    *,
    master_name: str | None = None,
    sentinel_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> redis.Redis | redis.cluster.RedisCluster:
    """Return a client of the Redis, Sentinel master or Cluster that url names.

    options are redis-py connection options for the data servers, over DEFAULT_OPTIONS.
    master_name is required by sentinel:// URLs (ignored otherwise); sentinel_kwargs are the
    options of the connections to the sentinels themselves, e.g. {"password": ...}.
    RedisCluster reads the slot map at once: if no listed node answers, this raises
    redis.exceptions.RedisClusterException.
    """
    client: redis.Redis | redis.cluster.RedisCluster = _build(
        _SYNC, url, master_name, sentinel_kwargs, options
    )
    return client


def async_client_from_url(
    url: str,
    *,
    master_name: str | None = None,
    sentinel_kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """Return an asyncio client of what url names; the same forms and options as client_from_url.

    No connection is made before the first command, the cluster's slot map included.
    """
    client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster = _build(
        _ASYNC, url, master_name, sentinel_kwargs, options
    )
    return client


class MasterFollowingPool(redis.sentinel.SentinelConnectionPool):
    """A Sentinel master pool that asks the sentinels who is master at most once a second.

    redis-py asks only when it opens a connection, and a master demoted by SENTINEL FAILOVER
    keeps taking writes until the sentinels reconfigure it, about 10 s later: every write a
    pooled connection sent it meanwhile was lost. Asking as a connection is handed out closes
    the idle connections to a server that is no longer the master.
    """

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._check_at = time.monotonic() + MASTER_CHECK_SECONDS

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now >= self._check_at:
            self._check_at = now + MASTER_CHECK_SECONDS
            # No sentinel answers: keep the connections we have; if the master is gone too,
            # they fail on their own.
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                self.get_master_address()
        return super().get_connection(*args, **kwargs)


class AsyncMasterFollowingPool(redis.asyncio.sentinel.SentinelConnectionPool):
    """MasterFollowingPool for asyncio clients."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self._check_at = time.monotonic() + MASTER_CHECK_SECONDS

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now >= self._check_at:
            self._check_at = now + MASTER_CHECK_SECONDS
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                await self.get_master_address()
        return await super().get_connection(*args, **kwargs)


@dataclass(frozen=True)
class _Flavour:
    """The redis-py classes of one side, sync or asyncio."""

    redis: Any
    cluster: Any
    cluster_node: Any
    sentinel: Any
    master_pool: Any
    retry: Any


_SYNC = _Flavour(redis.Redis, redis.cluster.RedisCluster, redis.cluster.ClusterNode,
                 redis.sentinel.Sentinel, MasterFollowingPool, Retry)
_ASYNC = _Flavour(redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster,
                  redis.asyncio.cluster.ClusterNode, redis.asyncio.sentinel.Sentinel,
                  AsyncMasterFollowingPool, redis.asyncio.retry.Retry)


def _build(
    flavour: _Flavour,
    url: str,
    master_name: str | None,
    sentinel_kwargs: dict[str, Any] | None,
    options: dict[str, Any],
) -> Any:
    target = parse_url(url)
    # One immediate retry, on a fresh connection, of a command whose connection broke: the
    # server closed it (restart, idle timeout, the CLIENT KILL a sentinel sends a demoted
    # master) or a demoted master answered READONLY, which redis-py's Sentinel connection
    # turns into a ConnectionError; for a Sentinel client the fresh connection asks the
    # sentinels where the master is now. Not on a timeout: a write that timed out may have
    # run. Anything longer is the store's job: it falls back and tries again once per
    # reconnect_interval instead of holding the guarded call.
    retry = flavour.retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    settings = {**DEFAULT_OPTIONS, "retry": retry, **options}
    if target.kind == "redis":
        return flavour.redis.from_url(url, **settings)
    if target.kind == "cluster":
        # The cluster client's own retry, which re-reads the slot map between tries; its
        # default (10, with backoff) would hold a call for seconds too.
        settings["retry"] = options.get("retry", flavour.retry(NoBackoff(), 1))
        settings.update(_credentials(target))
        if target.ssl:
            settings["ssl"] = True
        nodes = [flavour.cluster_node(host, port) for host, port in target.addresses]
        return flavour.cluster(startup_nodes=nodes, **settings)
    sentinel = flavour.sentinel(
        target.addresses,
        sentinel_kwargs=_sentinel_options(settings, sentinel_kwargs, flavour.retry),
        **settings,
    )
    return sentinel.master_for(
        _check_master_name(master_name),
        connection_pool_class=flavour.master_pool,
        db=target.db,
        **_credentials(target),
    )


def _sentinel_options(
    settings: dict[str, Any], given: dict[str, Any] | None, retry_class: Any
) -> dict[str, Any]:
    # No retries: redis-py would give every sentinel client its default of 10 with backoff,
    # and a dead sentinel cost 4.3 s per command before the next one was asked.
    if given is not None and not isinstance(given, dict):
        raise ValueError(
            f"sentinel_kwargs must be a dict of connection options, got {type(given).__name__}"
        )
    inherited = {k: v for k, v in settings.items() if k.startswith("socket_")}
    return {**inherited, "retry": retry_class(NoBackoff(), 0), **(given or {})}


def _check_master_name(master_name: object) -> str:
    if not isinstance(master_name, str) or not master_name:
        raise ValueError(
            "master_name is required with a sentinel:// URL: the name the sentinels monitor "
            "(`sentinel monitor <name> ...`; in Celery, broker_transport_options['master_name'] "
            f"or breaker_redis_master_name), got {master_name!r}"
        )
    return master_name


def _credentials(target: RedisTarget) -> dict[str, Any]:
    found = {"username": target.username, "password": target.password}
    return {key: value for key, value in found.items() if value is not None}


def _mask_part(part: str) -> str:
    match = _USERINFO.match(part)
    if match:
        user, colon, _password = match["userinfo"].partition(":")
        if colon:
            part = f"{match['scheme']}{user}:***@{part[match.end():]}"
    return _QUERY_PASSWORD.sub(r"\1***", part)


def _split(url: str, part: str) -> SplitResult:
    try:
        split = urlsplit(part)
        split.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError:
        raise ValueError(f"url has a bad host or port: {safe_url(url)!r}") from None
    return split


def _userinfo(split: SplitResult) -> tuple[str | None, str | None]:
    username = unquote(split.username) if split.username else None
    password = unquote(split.password) if split.password else None
    return username, password


def _parse_single(url: str, scheme: str) -> RedisTarget:
    split = _split(url, url)
    username, password = _userinfo(split)
    # As redis-py reads it: a db in the query string wins over the path.
    query_db = dict(parse_qsl(split.query)).get("db")
    if scheme == "unix":
        if not split.path:
            raise ValueError(f"url of a unix socket needs a path, e.g. unix:///run/redis.sock: "
                             f"{safe_url(url)!r}")
        return RedisTarget("redis", (), db=_db(url, query_db or ""),
                           username=username, password=password)
    if not split.hostname:
        raise ValueError(f"url needs a host: {safe_url(url)!r}")
    return RedisTarget(
        "redis",
        ((split.hostname, split.port or REDIS_PORT),),
        db=_db(url, query_db or split.path),
        ssl=scheme == "rediss",
        username=username,
        password=password,
    )


def _parse_sentinel(url: str) -> RedisTarget:
    addresses: list[tuple[str, int]] = []
    credentials: set[tuple[str | None, str | None]] = set()
    dbs: set[int] = set()
    for i, part in enumerate(_PART_SEPARATOR.split(url)):
        split = _split(url, part)
        if split.scheme.lower() != "sentinel":
            raise ValueError(
                f"url part {i + 1} must be sentinel://host:port as well: {safe_url(url)!r}"
            )
        if not split.hostname:
            raise ValueError(f"url part {i + 1} needs a sentinel host: {safe_url(url)!r}")
        if split.query or split.fragment:
            raise ValueError(
                "url: a sentinel:// URL takes no query or fragment; pass options as keyword "
                f"arguments: {safe_url(url)!r}"
            )
        addresses.append((split.hostname, split.port or SENTINEL_PORT))
        if split.username or split.password:
            credentials.add(_userinfo(split))
        # The db may follow the first part (kombu's form) or the last (CONTRACT.md's).
        if split.path not in ("", "/"):
            dbs.add(_db(url, split.path))
    if len(credentials) > 1:
        raise ValueError(
            "url: the parts of a sentinel:// URL give different user names or passwords; "
            "the URL's are the master's, give them once (the sentinels' go in sentinel_kwargs): "
            f"{safe_url(url)!r}"
        )
    if len(dbs) > 1:
        raise ValueError(f"url: the parts of a sentinel:// URL name different dbs: "
                         f"{safe_url(url)!r}")
    username, password = credentials.pop() if credentials else (None, None)
    return RedisTarget("sentinel", tuple(addresses), db=dbs.pop() if dbs else 0,
                       username=username, password=password)


def _parse_cluster(url: str, *, ssl: bool) -> RedisTarget:
    userinfo, at, rest = url.partition("://")[2].rpartition("@")
    hosts, _, path = rest.partition("/")
    if any(mark in rest for mark in "?#"):
        raise ValueError(
            "url: a redis+cluster:// URL takes no query or fragment; pass options as keyword "
            f"arguments: {safe_url(url)!r}"
        )
    addresses = []
    for node in hosts.split(","):
        node_split = _split(url, f"//{node}")
        if not node_split.hostname:
            raise ValueError(f"url lists a cluster node without a host: {safe_url(url)!r}")
        addresses.append((node_split.hostname, node_split.port or REDIS_PORT))
    if _db(url, path) != 0:
        raise ValueError(f"url: a Redis Cluster has only db 0: {safe_url(url)!r}")
    user, colon, password = userinfo.partition(":")
    return RedisTarget(
        "cluster",
        tuple(addresses),
        ssl=ssl,
        username=unquote(user) if at and user else None,
        password=unquote(password) if colon and password else None,
    )


def _db(url: str, path: str) -> int:
    number = path.strip("/")
    if not number:
        return 0
    if not number.isdigit():
        raise ValueError(f"url: the db must be a number, as in /0: {safe_url(url)!r}")
    return int(number)
