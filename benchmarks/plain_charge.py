"""The charge task a Celery user would write without this project: the benchmarks' baseline.

`celery -A benchmarks.plain_charge worker` runs it. One POST to the provider with an
idempotency key derived from the order and token, Celery's own retries with exponential
backoff on any HTTP error, the result in the backend; no breaker, no order book, no
validation beyond the provider's. It shares the worker settings that are not about the
charge code (JSON only, acks late, task events on, the same prefetch), so that a comparison
with payments.charge measures the charge code and not the configuration.

Environment: CELERY_BROKER_URL, CELERY_RESULT_BACKEND, PAYMENT_PROVIDER_URL,
PAYMENT_PROVIDER_API_KEY (optional), PLAIN_QUEUE_TYPE ("quorum" on RabbitMQ, as the
workers of this project use there).
"""

from __future__ import annotations

import os
from typing import Any

import httpx
from celery import Celery, Task

TASK = "bench.plain_charge"
QUEUE = "plain"

app = Celery("plain")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("CELERY_RESULT_BACKEND"),
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_send_task_events=True,
    task_track_started=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("PLAIN_QUEUE_TYPE") == "quorum":
    # Celery's native delayed delivery on RabbitMQ wants quorum queues on topic exchanges.
    app.conf.update(task_default_queue_type="quorum", task_default_exchange_type="topic",
                    broker_transport_options={"confirm_publish": True})

_client: httpx.Client | None = None


def client() -> httpx.Client:
    """Return this process's HTTP client of the provider (made on first use, after fork)."""
    global _client
    if _client is None:
        key = os.environ.get("PAYMENT_PROVIDER_API_KEY", "")
        _client = httpx.Client(
            base_url=os.environ["PAYMENT_PROVIDER_URL"],
            timeout=10.0,
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )
    return _client


@app.task(
    bind=True, name=TASK, autoretry_for=(httpx.HTTPError,), retry_backoff=True,
    retry_backoff_max=30, retry_jitter=True, max_retries=50,
)
def charge(self: Task[Any, Any], order_id: str, amount: int, currency: str,
           payment_token: str, payment_method: str = "card") -> dict[str, Any]:
    """Charge the order once (the idempotency key makes a retry safe) and return the charge."""
    response = client().post(
        "/v1/charges",
        json={"amount": amount, "currency": currency, "source": payment_token,
              "metadata": {"order_id": order_id}},
        headers={"Idempotency-Key": f"{order_id}:{payment_token}"},
    )
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer
