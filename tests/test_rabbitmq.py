"""RabbitMQ as the broker at scale: quorum queues, countdown charges waiting in the broker.

Runs against the RabbitMQ on 127.0.0.1:5672 when one answers, in a vhost of the test's own
(made and deleted with rabbitmqctl); skips, saying why, where there is none.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection

from tests import rabbitmq
from tests.waiting import wait_until
from tests.worker_process import WorkerProcess, charge_kwargs, web_client
from workers.celery import create_app
from workers.consumer import Consumer
from workers.sandbox import SandboxControl, SandboxServer

pytestmark = pytest.mark.slow


@pytest.fixture
def rabbitmq_vhost() -> Iterator[str]:
    """Return an amqp:// URL on a vhost of this test's own; delete the vhost afterwards."""
    reason = rabbitmq.unavailable(vhosts=True)
    if reason:
        pytest.skip(reason)
    try:
        with rabbitmq.own_vhost("pb-test") as url:
            yield url
    except rabbitmq.VhostError as exc:
        pytest.skip(str(exc))


def delayed(url: str) -> int:
    """Return how many messages wait in the broker's native delayed-delivery queues."""
    # A passive declare answers with the queue's own count; rabbitmqctl's lags up to 5 s.
    with Connection(url, connect_timeout=2) as connection:
        channel = connection.channel()
        return sum(
            channel.queue_declare(f"celery_delayed_{level}", passive=True).message_count
            for level in range(28)
        )


def quorum_worker_env(
    tmp_path: Path, broker_url: str, redis_url: str, provider_url: str, **settings: str
) -> dict[str, str]:
    """Return a worker's environment on RabbitMQ quorum queues, with a config module saying so.

    The breaker never opens (the provider's failures are retried, not refused); settings add
    to or replace the defaults here.
    """
    (tmp_path / "shop_rabbit.py").write_text('task_default_queue_type = "quorum"\n')
    return {
        "CELERY_CONFIG_MODULE": "shop_rabbit",
        "PYTHONPATH": str(tmp_path),
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "BREAKER_REDIS_URL": redis_url,
        "PAYMENT_PROVIDER_URL": provider_url,
        "PAYMENT_PROVIDER_TIMEOUT": "1",
        "BREAKER_FAILURE_THRESHOLD": "100000",
        "PAYMENT_CHARGE_DEADLINE": "120",
        **settings,
    }


def quorum_web_client(broker_url: str, redis_url: str) -> Celery:
    """Return the web tier's app, declaring the queue as the workers do: quorum, topic."""
    web: Celery = web_client(broker_url, redis_url)
    web.conf.update(task_default_queue_type="quorum", task_default_exchange_type="topic")
    return web


def test_countdown_charges_wait_in_rabbitmq_quorum_queues_not_in_the_worker(
    tmp_path: Path,
    rabbitmq_vhost: str,
    redis_url: str,
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
) -> None:
    # The provider fails and the breaker stays closed: every charge retries after 5 to 10 s.
    env = quorum_worker_env(
        tmp_path, rabbitmq_vhost, redis_url, sandbox_server.url,
        PAYMENT_RETRY_BACKOFF="10", PAYMENT_RETRY_BACKOFF_MAX="10", PAYMENT_MAX_ATTEMPTS="10",
    )
    web = quorum_web_client(rabbitmq_vhost, redis_url)
    orders = [f"ord_{uuid.uuid4().hex[:8]}_{i}" for i in range(200)]
    sandbox.set_faults("down", status=503)
    args = ["--pool", "prefork", "--concurrency", "2"]
    try:
        with WorkerProcess(env, tmp_path / "worker.log", args) as worker:
            tasks = [web.send_task("payments.charge", kwargs=charge_kwargs(o)) for o in orders]
            # The first retries wait 5 to 10 s: look while they certainly still do.
            wait_until(
                lambda: worker.log().count("failed: HTTP 503; retrying") >= 20, 30,
                "charges to fail once and be rescheduled",
            )
            held = web.control.inspect(timeout=1).scheduled() or {}
            waiting = delayed(rabbitmq_vhost)
            wait_until(
                lambda: worker.log().count("failed: HTTP 503; retrying") >= len(orders), 60,
                "every charge to fail once and be rescheduled",
            )
            sandbox.set_faults("ok")
            results = [t.get(timeout=60, interval=0.2) for t in tasks]
    finally:
        web.close()

    # The worker holds none of the rescheduled charges: they wait in the broker's
    # delayed-delivery queues until due.
    assert held, "no worker answered inspect scheduled"
    assert all(not scheduled for scheduled in held.values()), held
    assert waiting >= 1
    assert [r["status"] for r in results] == ["succeeded"] * len(orders)
    assert sandbox.ledger()["charges_by_order"] == dict.fromkeys(orders, 1)


def test_a_sub_second_retry_is_published_on_quorum_queues_in_whole_seconds(
    tmp_path: Path,
    rabbitmq_vhost: str,
    redis_url: str,
    sandbox_server: SandboxServer,
    sandbox: SandboxControl,
) -> None:
    # Celery's native delayed delivery sends int(countdown) seconds and refuses 0: the default
    # backoff's first retry (0.5 to 1 s) could not be published, blocking the pool process
    # through the publish retries, and went back to the queue to run again at once.
    # Retries after 0.4 to 0.8 s, then 0.8 to 1.6 s.
    env = quorum_worker_env(
        tmp_path, rabbitmq_vhost, redis_url, sandbox_server.url,
        PAYMENT_RETRY_BACKOFF="0.8", PAYMENT_MAX_ATTEMPTS="5",
    )
    web = quorum_web_client(rabbitmq_vhost, redis_url)
    orders = [f"ord_{uuid.uuid4().hex[:8]}_{i}" for i in range(4)]
    sandbox.set_faults("down", status=503)
    args = ["--pool", "prefork", "--concurrency", "2"]
    try:
        with WorkerProcess(env, tmp_path / "worker.log", args) as worker:
            tasks = [web.send_task("payments.charge", kwargs=charge_kwargs(o)) for o in orders]
            wait_until(
                lambda: len(re.findall(r"Charge \S+ attempt 2/5 failed", worker.log()))
                >= len(orders), 60,
                "every charge to fail twice",
            )
            sandbox.set_faults("ok")
            results = [t.get(timeout=60, interval=0.2) for t in tasks]
            log = worker.log()
    finally:
        web.close()

    assert "could not be published" not in log
    waits = re.findall(r"Charge \S+ attempt \d/5 failed: HTTP 503; retrying in ([\d.]+)s", log)
    assert len(waits) >= 2 * len(orders)
    # Whole seconds, rounded up: never due before the backoff the charge chose.
    assert {float(w) for w in waits} <= {1.0, 2.0}, waits
    assert [r["status"] for r in results] == ["succeeded"] * len(orders)
    assert sandbox.ledger()["charges_by_order"] == dict.fromkeys(orders, 1)


def test_the_workers_task_events_are_published_without_confirms(rabbitmq_vhost: str) -> None:
    # The worker confirms its publishes on quorum queues; events waited a broker round trip
    # each for a confirm no one reads.
    app = create_app("events-test", broker_url=rabbitmq_vhost, task_default_queue_type="quorum")
    consumer = object.__new__(Consumer)  # only the app and the connection settings are used
    consumer.app = app
    consumer.first_connection_attempt = True
    consumer.broker_connection_retry_attempt = 0
    with app.connection_for_write() as tasks, consumer.connection_for_write() as events:
        tasks.connect()
        assert tasks.connection.confirm_publish is True  # what charges are published with
        assert events.connection.confirm_publish is False
        assert events.transport_options["confirm_publish"] is False
