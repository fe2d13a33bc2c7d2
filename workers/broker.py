"""kombu's Redis transports, made to keep every message when the broker is at maxmemory.

kombu delivers a message by BRPOP, then records it as unacked (ZADD + HSET). BRPOP is
allowed over maxmemory but the ZADD is not, so under ``maxmemory-policy noeviction`` the
message has already left its queue when the record is refused: it is lost, and the
consumer dies with "Unrecoverable error". Acks die the same way: kombu removes the record in
a MULTI transaction, and Redis refuses every command queued in MULTI over maxmemory.
These transports record and remove outside a transaction when the broker is full, and a
reject with requeue that the broker refuses leaves the message unacked, restored by the
visibility timeout, instead of leaking a prefetch slot.

They also keep one Redis client per channel where kombu builds one for every command it
sends (each unacked record, ack and event publish): about 150 us of Python per client,
four times per message in the worker's main process.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
import redis.sentinel
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

from breaker.connection import MasterFollowingPool

log = logging.getLogger("workers.broker")

# Redis refuses a script's first "denyoom" write over maxmemory, but once the script has
# written anything it lets the rest run, so that a script never stops half-applied. The
# ZREM (a write that is not denyoom) is that first write; the record follows.
# KEYS[1] unacked index (sorted set), KEYS[2] unacked hash; ARGV[1] delivery tag,
# ARGV[2] delivery time (unix s), ARGV[3] the message as kombu stores it.
RECORD_UNACKED = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""
# Removing frees memory: allowed over maxmemory, except inside MULTI. Same KEYS; ARGV[1] tag.
REMOVE_UNACKED = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


def refuses_writes(exc: BaseException) -> bool:
    """Return True if a Redis error says the server refuses writes (maxmemory, MISCONF)."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError | redis.exceptions.ExecAbortError):
        return True
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and (
        "command not allowed when used memory" in text or "MISCONF" in text
    )


class QoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, keeping messages that arrive while the broker is full."""

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record a delivered message as unacked, over maxmemory if need be."""
        try:
            super().append(message, delivery_tag)
        except redis.RedisError as exc:
            if not refuses_writes(exc):
                raise
            self._record_over_maxmemory(message, delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            log.warning(
                "Broker refuses writes (%s); message %s recorded as unacked anyway so that "
                "it is not lost", type(exc).__name__, delivery_tag,
            )

    def ack(self, delivery_tag: str) -> None:
        """Forget an acked message's record, outside a transaction if the broker is full."""
        try:
            super().ack(delivery_tag)
        except redis.RedisError as exc:
            if not refuses_writes(exc):
                raise
            self._eval(REMOVE_UNACKED, delivery_tag)
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Reject a message; a requeue the broker refuses leaves it for the visibility timeout."""
        if not requeue:
            try:
                super().reject(delivery_tag, requeue=False)
            except redis.RedisError as exc:
                if not refuses_writes(exc):
                    raise
                self._eval(REMOVE_UNACKED, delivery_tag)
                virtual.QoS.ack(self, delivery_tag)
            return
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)
        except redis.RedisError as exc:
            if not refuses_writes(exc):
                raise
            log.warning(
                "Broker refuses writes (%s); message %s stays unacked and comes back after "
                "the visibility timeout (%gs)",
                type(exc).__name__, delivery_tag, self.visibility_timeout,
            )
        virtual.QoS.ack(self, delivery_tag)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Restore messages past the visibility timeout; wait while the broker refuses writes."""
        try:
            super().restore_visible(*args, **kwargs)
        except redis.RedisError as exc:
            if not refuses_writes(exc):
                raise
            log.warning(
                "Broker refuses writes (%s); unacked messages are restored once it accepts "
                "them again", type(exc).__name__,
            )

    def _record_over_maxmemory(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        payload = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        self._eval(RECORD_UNACKED, delivery_tag, time.time(), payload)

    def _eval(self, script: str, *args: Any) -> None:
        with self.channel.conn_or_acquire() as client:
            # EVAL is not among the commands kombu's client prefixes: prefix the keys here.
            prefix = getattr(client, "global_keyprefix", "")
            keys = [prefix + self.unacked_index_key, prefix + self.unacked_key]
            client.eval(script, 2, *keys, *args)


class _OneClient:
    """A channel that reuses its Redis client for commands, as long as its pool lasts.

    kombu's conn_or_acquire makes a new redis.Redis for every command (building its table of
    response callbacks each time); the client holds no connection of its own, only the
    channel's pool, so one per pool does the same work. kombu replaces the pool after a
    connection error (_disconnect_pools): the client is then made again on the new pool.
    The asynchronous client (BRPOP, the event loop's) is kombu's own, made once already.
    """

    _sync_client: Any = None
    pool: Any

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()  # type: ignore[misc]
        return client


class Channel(_OneClient, kombu_redis.Channel):
    """kombu's Redis channel with the QoS above."""

    QoS = QoS


class SentinelChannel(_OneClient, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with the QoS above, following the master as it moves.

    redis-py asks the sentinels for the master only when it opens a connection: after a
    SENTINEL FAILOVER, pooled connections kept writing to the demoted master for about 10 s,
    and those writes (reschedules, acks, results) were lost when it resynced.
    """

    QoS = QoS

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        pool = super()._sentinel_managed_pool(asynchronous)
        if not isinstance(pool, redis.sentinel.SentinelConnectionPool):
            return pool
        # The pool kombu built is unused yet: the same pool, of the master-following kind.
        kwargs = dict(pool.connection_kwargs)
        kwargs.pop("connection_pool", None)
        return MasterFollowingPool(
            pool.service_name,
            pool.sentinel_manager,
            connection_class=pool.connection_class,
            max_connections=pool.max_connections,
            is_master=pool.is_master,
            check_connection=pool.check_connection,
            **kwargs,
        )


class Transport(kombu_redis.Transport):
    """The redis://, rediss:// and redis+socket:// transport."""

    Channel = Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """The sentinel:// transport."""

    Channel = SentinelChannel
