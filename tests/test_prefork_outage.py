"""A provider outage under a real prefork worker with beat: charged once, provider spared."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult
from kombu.connection import Connection

from breaker import CircuitBreaker, RedisStore
from tests import rabbitmq
from tests.waiting import wait_until
from tests.worker_process import WorkerProcess, charge_kwargs, web_client
from workers.sandbox import SandboxControl, SandboxServer

pytestmark = pytest.mark.slow

BREAKER = "payments.card"
FAILURE_THRESHOLD = 3
HALF_OPEN_MAX_CALLS = 2
CONCURRENCY = 2
# Long against the publish interval, so the publisher has several chances to see HALF_OPEN.
BREAKER_TIMEOUT = 1.0
PUBLISH_INTERVAL = 0.2
RABBITMQ_URL = rabbitmq.DEFAULT_URL


def worker_env(broker_url: str, redis_url: str, provider_url: str) -> dict[str, str]:
    """Return the environment of a worker with short timeouts, as CONTRACT.md section 6 names it."""
    return {
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "BREAKER_REDIS_URL": redis_url,
        "PAYMENT_PROVIDER_URL": provider_url,
        "BREAKER_FAILURE_THRESHOLD": str(FAILURE_THRESHOLD),
        "BREAKER_HALF_OPEN_MAX_CALLS": str(HALF_OPEN_MAX_CALLS),
        "BREAKER_TIMEOUT": str(BREAKER_TIMEOUT),
        "BREAKER_PUBLISH_INTERVAL": str(PUBLISH_INTERVAL),
        "PAYMENT_PROVIDER_TIMEOUT": "1",
        "PAYMENT_RETRY_BACKOFF": "0.05",
        "PAYMENT_RETRY_BACKOFF_MAX": "0.2",
        "PAYMENT_CHARGE_DEADLINE": "120",
        "PAYMENT_MAX_ATTEMPTS": "50",
    }


class StateChannel:
    """Every message published on the breaker state channel while the listener runs."""

    def __init__(self, redis_url: str, channel: str = "breaker:state") -> None:
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(**{channel: self._received})
        self._lock = threading.Lock()
        self._messages: list[dict[str, Any]] = []
        self._thread = self._pubsub.run_in_thread(sleep_time=0.01, daemon=True)

    def _received(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._messages.append(json.loads(message["data"]))

    def messages(self) -> list[dict[str, Any]]:
        """Return the messages so far, in the order they were published."""
        with self._lock:
            return sorted(self._messages, key=lambda m: float(m["published_at"]))

    def snapshots(self, name: str) -> list[dict[str, Any]]:
        """Return the published snapshots of breaker name, in publication order."""
        return [
            {**b, "published_at": m["published_at"]}
            for m in self.messages()
            for b in m["breakers"]
            if b["name"] == name
        ]

    def states(self, name: str) -> list[str]:
        """Return the published states of breaker name, repeats removed."""
        states: list[str] = []
        for snap in self.snapshots(name):
            if not states or states[-1] != snap["state"]:
                states.append(snap["state"])
        return states

    def latest(self, name: str, after: float = 0.0) -> dict[str, Any] | None:
        """Return the latest snapshot of name published after the given unix time, if any."""
        found = [s for s in self.snapshots(name) if s["published_at"] > after]
        return found[-1] if found else None

    def close(self) -> None:
        """Stop listening and close the connection."""
        self._thread.stop()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()


@pytest.fixture
def state_channel(redis_url: str) -> Iterator[StateChannel]:
    """Listen on the breaker state channel of the private Redis for the whole test."""
    channel = StateChannel(redis_url)
    try:
        yield channel
    finally:
        channel.close()


def opens(transitions: dict[str, int]) -> int:
    """Return how many times a circuit went to OPEN: the number of its open periods."""
    return sum(count for edge, count in transitions.items() if edge.endswith("->open"))


def is_subsequence(wanted: list[str], seen: list[str]) -> bool:
    """Return True if wanted appears in seen in order, other items allowed in between."""
    remaining = iter(seen)
    return all(item in remaining for item in wanted)


def results_of(tasks: list[AsyncResult], timeout: float) -> list[dict[str, Any]]:
    """Return every task's result, failing the test if they are not all in by the deadline."""
    deadline = time.monotonic() + timeout
    return [t.get(timeout=max(0.1, deadline - time.monotonic()), interval=0.05) for t in tasks]


def send_charges(client: Celery, orders: list[str], **options: Any) -> list[AsyncResult]:
    """Enqueue one charge per order by task name, as the web tier does."""
    return [
        client.send_task("payments.charge", kwargs=charge_kwargs(order), **options)
        for order in orders
    ]


def provider_failures(sandbox: SandboxControl) -> int:
    """Return how many charge requests the sandbox answered 503 (those made while it was down)."""
    return sum(1 for event in sandbox.ledger()["events"] if event["status"] == 503)


def assert_charged_once(
    sandbox: SandboxControl, orders: list[str], results: list[dict[str, Any]]
) -> None:
    """Assert every order's task succeeded and the provider holds exactly one charge for it."""
    assert [r["status"] for r in results] == ["succeeded"] * len(orders)
    assert [r["order_id"] for r in results] == orders
    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == dict.fromkeys(orders, 1)
    assert {r["charge_id"] for r in results} == {c["id"] for c in ledger["charges"]}


def test_outage_under_prefork_worker_charges_each_order_once_and_spares_the_provider(
    tmp_path: Path,
    redis_url: str,
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
    state_channel: StateChannel,
) -> None:
    env = worker_env(redis_url, redis_url, sandbox_server.url)
    args = ["-B", "--schedule", str(tmp_path / "beat-schedule"),
            "--pool", "prefork", "--concurrency", str(CONCURRENCY)]
    client = web_client(redis_url, redis_url)
    store = RedisStore.from_url(redis_url)
    circuit = CircuitBreaker(
        BREAKER, failure_threshold=FAILURE_THRESHOLD, timeout_seconds=BREAKER_TIMEOUT,
        half_open_max_calls=HALF_OPEN_MAX_CALLS, store=store,
    )
    batch = uuid.uuid4().hex[:8]
    orders = [f"ord_{batch}_{i:03d}" for i in range(40)]
    try:
        with WorkerProcess(env, tmp_path / "worker.log", args):
            before = send_charges(client, orders[:10])
            results = results_of(before, timeout=20)
            wait_until(
                lambda: (s := state_channel.latest(BREAKER)) and s["state"] == "closed",
                10,
                "the breaker published CLOSED",
            )

            sandbox.set_faults("down")
            down_at = time.time()
            during = send_charges(client, orders[10:])
            # Down for about 3 x breaker_timeout: until two probes failed and it re-opened.
            wait_until(
                lambda: opens(circuit.snapshot()["transitions"]) >= 3,
                10 * BREAKER_TIMEOUT,
                "three open periods while the provider is down",
            )
            sandbox.set_faults("ok")
            up_at = time.time()
            results += results_of(during, timeout=30)
            done_at = time.time()
            final = wait_until(
                lambda: state_channel.latest(BREAKER, after=done_at),
                10,
                "a publication after every charge ended",
            )
    finally:
        client.close()
        store.client.close()

    assert_charged_once(sandbox, orders, results)

    assert final["state"] == "closed"
    transitions = final["transitions"]
    # Opened once from CLOSED, re-opened only by failed probes, closed once through HALF_OPEN.
    assert transitions.get("closed->open") == 1
    assert transitions.get("half_open->closed") == 1
    assert "open->closed" not in transitions
    open_periods = opens(transitions)
    calls_while_down = provider_failures(sandbox)
    bound = FAILURE_THRESHOLD + CONCURRENCY + HALF_OPEN_MAX_CALLS * open_periods
    assert FAILURE_THRESHOLD <= calls_while_down <= bound, (
        f"{calls_while_down} calls reached the provider while it was down "
        f"over {open_periods} open periods; at most {bound} allowed"
    )

    # HALF_OPEN lasts only until the first probes answer, often less than a publish interval:
    # the channel must show CLOSED, OPEN, CLOSED in order, and the published transitions above
    # prove that the way back went through HALF_OPEN (half_open->closed, never open->closed).
    states = state_channel.states(BREAKER)
    assert is_subsequence(["closed", "open", "closed"], states), states
    assert transitions.get("open->half_open", 0) == open_periods
    recovered_at = min(
        s["published_at"] for s in state_channel.snapshots(BREAKER)
        if s["published_at"] > up_at and s["state"] == "closed"
    )
    print(
        f"\noutage {up_at - down_at:.2f}s: {calls_while_down} calls reached the provider while "
        f"down over {open_periods} open periods (bound {bound}); published states {states}; "
        f"closed again {recovered_at - up_at:.2f}s and all charges done "
        f"{done_at - up_at:.2f}s after the provider came back; transitions {transitions}"
    )


@pytest.fixture
def rabbitmq_queue() -> Iterator[str]:
    """Return a queue name of this test's own on the local RabbitMQ; delete it afterwards."""
    reason = rabbitmq.unavailable()
    if reason:
        pytest.skip(reason)
    queue = f"pb-test-{uuid.uuid4().hex}"
    yield queue
    with Connection(RABBITMQ_URL, connect_timeout=2) as conn:
        channel = conn.channel()
        # Celery declares a direct exchange of the queue's name for a queue it creates.
        for delete in (channel.queue_delete, channel.exchange_delete):
            try:
                delete(queue)
            except Exception:
                channel = conn.channel()


def test_outage_with_rabbitmq_broker_charges_each_order_once(
    tmp_path: Path,
    redis_url: str,
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
    rabbitmq_queue: str,
) -> None:
    env = worker_env(RABBITMQ_URL, redis_url, sandbox_server.url)
    args = ["-Q", rabbitmq_queue, "--pool", "prefork", "--concurrency", str(CONCURRENCY)]
    client = web_client(RABBITMQ_URL, redis_url)
    store = RedisStore.from_url(redis_url)
    circuit = CircuitBreaker(
        BREAKER, failure_threshold=FAILURE_THRESHOLD, timeout_seconds=BREAKER_TIMEOUT,
        half_open_max_calls=HALF_OPEN_MAX_CALLS, store=store,
    )
    orders = [f"ord_{uuid.uuid4().hex[:8]}_{i:03d}" for i in range(10)]
    try:
        with WorkerProcess(env, tmp_path / "worker.log", args):
            sandbox.set_faults("down")
            tasks = send_charges(client, orders, queue=rabbitmq_queue)
            wait_until(
                lambda: opens(circuit.snapshot()["transitions"]) >= 2,
                10 * BREAKER_TIMEOUT,
                "a failed probe re-opening the circuit while the provider is down",
            )
            sandbox.set_faults("ok")
            results = results_of(tasks, timeout=30)
    finally:
        client.close()
        store.client.close()

    assert_charged_once(sandbox, orders, results)
    snapshot = circuit.snapshot()
    assert snapshot["state"] == "closed"
    assert snapshot["transitions"].get("half_open->closed") == 1
    bound = FAILURE_THRESHOLD + CONCURRENCY + HALF_OPEN_MAX_CALLS * opens(snapshot["transitions"])
    assert FAILURE_THRESHOLD <= provider_failures(sandbox) <= bound
