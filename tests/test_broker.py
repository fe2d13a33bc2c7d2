"""The Redis transport of workers/broker.py against a real redis-server: one client per pool.

kombu builds a redis.Redis client for every command (each unacked record, ack and event);
the channels here keep one per pool. These tests send, receive and ack through kombu's own
Connection and check that the client is reused, and made again when kombu replaces a pool.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Queue

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
