"""workers/consumer.py: task events sent a window at a time, on a real hub and Redis broker.

Celery's consumer schedules a send of its buffered task events on every event, for the event
loop's next turn, so that a worker handling one message a turn publishes once per message.
Ours publishes once per EVENT_FLUSH_SECONDS window. These tests drive the consumer's hook
with kombu's own Hub and Celery's own EventDispatcher, and read what reaches the broker.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.events import get_exchange
from celery.events.dispatcher import EventDispatcher
from kombu import Connection, Queue
from kombu.asynchronous import Hub

from tests.redis_server import RedisServer
from tests.waiting import wait_until
from tests.worker_process import WorkerProcess, charge_kwargs, web_client
from workers import consumer as consumer_module
from workers.celery import create_app
from workers.consumer import Consumer
from workers.sandbox import SandboxControl, SandboxServer


@pytest.fixture
def app(spare_redis_server: RedisServer) -> Celery:
    return create_app("consumer-test", broker_url=spare_redis_server.url,
                      result_backend=spare_redis_server.url)


@pytest.fixture
def wired(app: Celery) -> Iterator[tuple[Consumer, Hub, Messages]]:
    """A consumer with a hub and a task-event dispatcher, and a queue bound to the events."""
    hub = Hub()
    consumer = object.__new__(Consumer)  # only the hub and the dispatcher are used here
    consumer.hub = hub
    with app.connection_for_write() as conn, app.connection_for_read() as reader:
        consumer.event_dispatcher = EventDispatcher(
            conn, hostname="consumer-test@host", app=app, buffer_group=["task"],
            on_send_buffered=consumer.on_send_event_buffered,
        )
        # The event exchange is a fanout on Redis (PUBLISH): subscribe before anything is sent.
        queue = Queue("consumer-test-events", consumer.event_dispatcher.exchange,
                      routing_key="task.#", auto_delete=True)
        bodies: list[Any] = []
        with reader.Consumer(queue, callbacks=[lambda body, _: bodies.append(body)],
                             accept=["json"], no_ack=True):
            messages = Messages(reader, bodies)
            assert messages.take() == []  # kombu subscribes on the first drain
            yield consumer, hub, messages
        consumer.event_dispatcher.close()
    hub.close()


class Messages:
    """The event messages a subscriber on the broker received."""

    def __init__(self, reader: Connection, bodies: list[Any]) -> None:
        self.reader = reader
        self.bodies = bodies

    def take(self) -> list[Any]:
        """Return the messages that arrived since the last call (waiting up to 0.05 s)."""
        try:
            while True:
                self.reader.drain_events(timeout=0.05)
        except TimeoutError:
            pass
        taken, self.bodies[:] = list(self.bodies), []
        return taken


def test_the_app_names_our_consumer_unless_another_is_configured(
    spare_redis_server: RedisServer,
) -> None:
    assert create_app("c1", broker_url=spare_redis_server.url).conf.worker_consumer == (
        "workers.consumer:Consumer")
    mine = create_app("c2", broker_url=spare_redis_server.url,
                      worker_consumer="myproject.worker:Consumer")
    assert mine.conf.worker_consumer == "myproject.worker:Consumer"


def test_events_of_one_window_go_out_together_once_it_ends(
    wired: tuple[Consumer, Hub, Messages], monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer, hub, messages = wired
    monkeypatch.setattr(consumer_module, "EVENT_FLUSH_SECONDS", 0.2)
    dispatcher = consumer.event_dispatcher

    dispatcher.send("task-received", uuid="t1")
    hub.run_once()  # Celery's consumer would have sent it on this turn
    dispatcher.send("task-started", uuid="t1")
    dispatcher.send("task-succeeded", uuid="t1")

    assert len(hub.timer) == 1  # one send scheduled for the window, not one per event
    assert not hub._ready
    assert messages.take() == []
    deadline = time.monotonic() + 10
    bodies: list[Any] = []
    while not bodies and time.monotonic() < deadline:
        hub.run_once()
        bodies = messages.take()
    assert len(bodies) == 1, bodies
    assert [event["type"] for event in bodies[0]] == [
        "task-received", "task-started", "task-succeeded"]
    assert len(hub.timer) == 0

    dispatcher.send("task-received", uuid="t2")  # the next window starts with the next event
    assert len(hub.timer) == 1


def _task_events(bodies: list[Any]) -> list[dict[str, Any]]:
    """Return the task events in event messages: one event each, or a task.multi list."""
    events: list[dict[str, Any]] = []
    for body in bodies:
        events.extend(body if isinstance(body, list) else [body])
    return [e for e in events if str(e.get("type", "")).startswith("task-")]


def test_events_still_buffered_when_the_worker_shuts_down_are_sent(
    tmp_path: Path, redis_url: str, sandbox_server: SandboxServer, sandbox: SandboxControl
) -> None:
    # A window longer than the test: the charge's events can only go out at shutdown.
    (tmp_path / "long_window.py").write_text(
        "import workers.consumer\n\nworkers.consumer.EVENT_FLUSH_SECONDS = 3600\n"
    )
    env = {
        "CELERY_CONFIG_MODULE": "long_window",
        "PYTHONPATH": str(tmp_path),
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "BREAKER_REDIS_URL": redis_url,
        "PAYMENT_PROVIDER_URL": sandbox_server.url,
    }
    web = web_client(redis_url, redis_url)
    bodies: list[Any] = []
    try:
        with Connection(redis_url) as reader:
            queue = Queue(f"shutdown-events-{uuid.uuid4().hex[:8]}", get_exchange(reader),
                          routing_key="task.#", auto_delete=True)
            with reader.Consumer(queue, callbacks=[lambda body, _: bodies.append(body)],
                                 accept=["json"], no_ack=True):
                messages = Messages(reader, bodies)
                messages.take()  # kombu subscribes on the first drain
                args = ["--pool", "prefork", "--concurrency", "1"]
                with WorkerProcess(env, tmp_path / "worker.log", args):
                    task = web.send_task("payments.charge", kwargs=charge_kwargs("ord_bye"))
                    assert task.get(timeout=30)["status"] == "succeeded"
                    before_shutdown = _task_events(messages.take())
                # Stopped (warm shutdown): what it still held was sent on the way out.
                seen: list[dict[str, Any]] = []
                wait_until(
                    lambda: seen.extend(_task_events(messages.take())) or any(
                        e["type"] == "task-succeeded" and e["uuid"] == task.id for e in seen),
                    10, "the charge's task-succeeded event after the worker stopped",
                )
    finally:
        web.close()

    assert [e for e in before_shutdown if e.get("uuid") == task.id] == []
    assert {e["type"] for e in seen if e.get("uuid") == task.id} >= {
        "task-received", "task-started", "task-succeeded"}
