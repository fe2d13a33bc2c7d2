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

And they record a message as unacked once the consumer's callback has returned, not before:
a message acked in the callback (a charge the gate parked, workers/gate.py) then costs no
record and no removal, two round trips of four. The window in which a worker killed loses a
message it has taken off the queue is kombu's own (BRPOP, then the record), one callback
longer; a message the callback sent to the pool is recorded before the pool can ack it,
since acks are handled on the same event loop, after the callback.
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Delivered messages whose unacked record is not written yet (during the callback).
        self._unrecorded: dict[str, Any] = {}

    def append(self, message: Any, delivery_tag: str) -> None:
        """Record a delivered message as unacked, over maxmemory if need be."""
        self._record(message, delivery_tag)
        virtual.QoS.append(self, message, delivery_tag)

    def append_unrecorded(self, message: Any, delivery_tag: str) -> None:
        """Count a message as delivered; record() writes its record unless acked before."""
        virtual.QoS.append(self, message, delivery_tag)
        self._unrecorded[delivery_tag] = message

    def record(self, delivery_tag: str) -> None:
        """Write the unacked record of a message append_unrecorded took, if still unacked."""
        message = self._unrecorded.pop(delivery_tag, None)
        if message is not None:
            self._record(message, delivery_tag)

    def _record(self, message: Any, delivery_tag: str) -> None:
        delivery = message.delivery_info
        payload = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()}).hset(
                    self.unacked_key, delivery_tag, payload
                ).execute()
        except redis.RedisError as exc:
            if not refuses_writes(exc):
                raise
            self._eval(RECORD_UNACKED, delivery_tag, time.time(), payload)
            log.warning(
                "Broker refuses writes (%s); message %s recorded as unacked anyway so that "
                "it is not lost", type(exc).__name__, delivery_tag,
            )

    def ack(self, delivery_tag: str) -> None:
        """Forget an acked message's record, outside a transaction if the broker is full."""
        if self._unrecorded.pop(delivery_tag, None) is not None:
            virtual.QoS.ack(self, delivery_tag)  # acked before it was recorded: nothing to remove
            return
        try:
            super().ack(delivery_tag)
        except redis.RedisError as exc:
            if not refuses_writes(exc):
                raise
            self._eval(REMOVE_UNACKED, delivery_tag)
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        """Reject a message; a requeue the broker refuses leaves it for the visibility timeout."""
        self.record(delivery_tag)  # rejected in the callback: requeued from its record
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

    def restore_unacked(self, client: Any = None) -> None:
        """Restore every message delivered and not acked, those not yet recorded included."""
        for tag in list(self._unrecorded):
            self.record(tag)
        super().restore_unacked(client)

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
    qos: QoS
    connection: Any
    Message: Any

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[misc]
        pool = self.pool
        client = self._sync_client
        if client is None or client.connection_pool is not pool:
            client = self._sync_client = super()._create_client()  # type: ignore[misc]
        return client

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        """Consume from queue, recording each message as unacked after callback returns."""
        result = super().basic_consume(  # type: ignore[misc]
            queue, no_ack, callback, consumer_tag, **kwargs
        )
        if no_ack:
            return result

        def _callback(raw_message: Any) -> Any:
            # kombu's callback (virtual.Channel.basic_consume), with the record after it.
            message = self.Message(raw_message, channel=self)
            tag = message.delivery_tag
            self.qos.append_unrecorded(message, tag)
            try:
                return callback(message)
            finally:
                self.qos.record(tag)

        self.connection._callbacks[queue] = _callback
        return result


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
