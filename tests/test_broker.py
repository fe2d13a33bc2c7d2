"""The Redis transport of workers/broker.py against a real redis-server: one client per pool.

kombu builds a redis.Redis client for every command (each unacked record, ack and event);
the channels here keep one per pool. These tests send, receive and ack through kombu's own
Connection and check that the client is reused, and made again when kombu replaces a pool.
They also check when a delivered message is recorded as unacked: after the consumer's
callback, and not at all if the callback acked it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.message import Message

from tests.redis_server import RedisServer

QUEUE = Queue("broker-test", Exchange("broker-test"), routing_key="broker-test")


@pytest.fixture
def connection(spare_redis_server: RedisServer) -> Iterator[Connection]:
    with Connection(spare_redis_server.url, transport="workers.broker:Transport") as conn:
        yield conn


def round_trip(connection: Connection, body: dict[str, int]) -> dict[str, int]:
    """Send body, receive it with acks on, ack it; return what was received."""
    with connection.Producer() as producer:
        producer.publish(body, exchange=QUEUE.exchange, routing_key="broker-test",
                         declare=[QUEUE], serializer="json")
    with connection.SimpleQueue(QUEUE) as queue:
        message = queue.get(timeout=5)
        message.ack()
        payload: dict[str, int] = message.payload
        return payload


def test_a_channel_sends_receives_and_acks_with_one_client(
    connection: Connection, spare_redis_server: RedisServer
) -> None:
    channel = connection.default_channel
    first = channel._create_client()

    assert [round_trip(connection, {"n": n}) for n in range(3)] == [{"n": n} for n in range(3)]

    assert channel._create_client() is first
    assert first.connection_pool is channel.pool
    # Every ack removed its record: nothing is left unacked to be restored later.
    server = redis.Redis.from_url(spare_redis_server.url)
    assert server.hlen("unacked") == 0
    assert server.zcard("unacked_index") == 0
    server.close()


def test_a_pool_replaced_after_a_connection_error_gets_a_client_of_its_own(
    connection: Connection,
) -> None:
    channel = connection.default_channel
    old = channel._create_client()
    round_trip(connection, {"n": 1})

    channel._disconnect_pools()  # what kombu does when a connection fails

    new = channel._create_client()
    assert new is not old
    assert new.connection_pool is channel.pool is not old.connection_pool
    assert round_trip(connection, {"n": 2}) == {"n": 2}
    assert channel._create_client() is new


def publish(connection: Connection, body: dict[str, int]) -> None:
    with connection.Producer() as producer:
        producer.publish(body, exchange=QUEUE.exchange, routing_key="broker-test",
                         declare=[QUEUE], serializer="json")


def deliver_one(connection: Connection, during: Callable[[Message], None]) -> Message:
    """Consume one message with acks on, calling during(message) in the consumer callback."""
    delivered: list[Message] = []

    def on_message(body: Any, message: Message) -> None:
        delivered.append(message)
        during(message)

    with connection.Consumer(QUEUE, callbacks=[on_message], accept=["json"]):
        connection.drain_events(timeout=5)
    [message] = delivered
    return message


def commands(server: redis.Redis, *names: str) -> dict[str, int]:
    stats = server.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names}


def test_a_message_acked_while_it_is_delivered_is_never_recorded_as_unacked(
    connection: Connection, spare_redis_server: RedisServer
) -> None:
    server = redis.Redis.from_url(spare_redis_server.url)
    publish(connection, {"n": 1})
    server.config_resetstat()

    message = deliver_one(connection, lambda message: message.ack())

    assert message.payload == {"n": 1}
    # No record written, so none removed: the two round trips a parked charge saves.
    assert commands(server, "hset", "zadd", "hdel", "zrem") == {
        "hset": 0, "zadd": 0, "hdel": 0, "zrem": 0}
    assert server.llen("broker-test") == 0
    assert server.hlen("unacked") == 0
    qos = connection.default_channel.qos
    assert set(qos._delivered) <= qos._dirty  # nothing held unacked in the channel either
    server.close()


def test_a_message_not_acked_while_delivered_is_recorded_after_and_restored_at_close(
    connection: Connection, spare_redis_server: RedisServer
) -> None:
    server = redis.Redis.from_url(spare_redis_server.url)
    publish(connection, {"n": 2})
    seen_during: list[int] = []

    message = deliver_one(connection, lambda message: seen_during.append(server.hlen("unacked")))

    assert seen_during == [0]  # recorded once the callback has returned...
    assert server.hlen("unacked") == 1  # ...so that a worker that dies now loses nothing
    assert server.zscore("unacked_index", message.delivery_tag) is not None
    connection.close()  # kombu restores what its channel holds unacked
    assert server.llen("broker-test") == 1
    assert server.hlen("unacked") == 0
    server.close()


def test_a_message_requeued_while_it_is_delivered_goes_back_to_its_queue(
    connection: Connection, spare_redis_server: RedisServer
) -> None:
    server = redis.Redis.from_url(spare_redis_server.url)
    publish(connection, {"n": 3})

    deliver_one(connection, lambda message: message.requeue())

    assert server.llen("broker-test") == 1
    assert server.hlen("unacked") == 0
    qos = connection.default_channel.qos
    assert set(qos._delivered) <= qos._dirty  # nothing held unacked in the channel either
    with connection.SimpleQueue(QUEUE) as queue:
        again = queue.get(timeout=5)
        assert again.payload == {"n": 3}
        again.ack()
    server.close()
