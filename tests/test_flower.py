"""Flower, with no extra set-up, shows the charges, their retries and the publisher's results."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis
from celery import Celery

from tests.redis_server import free_port
from tests.waiting import wait_until
from workers.runtime import runtime
from workers.sandbox import SandboxControl, SandboxServer

CELERY = str(Path(sys.executable).with_name("celery"))

# The worker and the test's own breakers share these, so that the circuit the test opens
# is the one the worker reads, with the same timeout.
SETTINGS = {
    "breaker_timeout": 2.0,
    "breaker_publish_interval": 0.5,
    "payment_provider_timeout": 1.0,
    "payment_retry_backoff": 0.05,
    "payment_retry_backoff_max": 0.2,
    "payment_charge_deadline": 30.0,
}
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-test-password"

T = TypeVar("T")



def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process politely, then for good."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=10)


@pytest.fixture
def settings_env(redis_url: str, sandbox_server: SandboxServer) -> dict[str, str]:
    """Return the environment that points Flower and the worker at the test's servers."""
    return {
        **os.environ,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "PAYMENT_PROVIDER_URL": sandbox_server.url,
        **{name.upper(): str(value) for name, value in SETTINGS.items()},
    }


@pytest.fixture
def flower_only(settings_env: dict[str, str], tmp_path: Path) -> Iterator[httpx.Client]:
    """Run `celery -A workers flower` with basic auth; return a client holding the password."""
    port = free_port()
    log_path = tmp_path / "flower.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [CELERY, "-A", "workers", "flower", f"--port={port}", "--address=127.0.0.1"],
            # Basic auth the way docker-compose passes it: Flower reads its own variable.
            env={**settings_env, "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"},
            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )
    client = httpx.Client(
        base_url=f"http://127.0.0.1:{port}", auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=5
    )

    def healthy() -> bool | None:
        assert process.poll() is None, log_path.read_text()
        try:
            return client.get("/healthcheck").status_code == 200 or None
        except httpx.TransportError:
            return None

    try:
        wait_until(healthy, 30, "Flower to answer", interval=0.1)
        yield client
    finally:
        client.close()
        stop(process)


@pytest.fixture
def flower(
    flower_only: httpx.Client, settings_env: dict[str, str], sandbox: SandboxControl,
    tmp_path: Path,
) -> Iterator[httpx.Client]:
    """Add a worker with an embedded beat to Flower, started once Flower listens."""
    with (tmp_path / "worker.log").open("wb") as log:
        process = subprocess.Popen(
            [CELERY, "-A", "workers", "worker", "--pool=threads", "--concurrency=2",
             "--beat", f"--schedule={tmp_path / 'beat-schedule'}", "--without-mingle",
             "--without-gossip", "--loglevel=INFO", "--hostname=flower-test@%h"],
            env=settings_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield flower_only
    finally:
        stop(process)


def charge(order_id: str) -> dict[str, Any]:
    """Return the keyword arguments of a charge the sandbox accepts."""
    return {"order_id": order_id, "amount": 1999, "currency": "usd", "payment_token": "tok_visa"}


def task_info(client: httpx.Client, task_id: str, state: str) -> dict[str, Any] | None:
    """Return Flower's record of a task once it is in state, else None."""
    response = client.get(f"/api/task/info/{task_id}")
    if response.status_code == 404:
        return None
    response.raise_for_status()
    info: dict[str, Any] = response.json()
    return info if info["state"] == state else None


def published(client: httpx.Client, mentioning: str) -> dict[str, Any] | None:
    """Return a succeeded breaker.publish_state task whose result mentions a text, else None."""
    response = client.get(
        "/api/tasks", params={"taskname": "breaker.publish_state", "state": "SUCCESS"}
    )
    response.raise_for_status()
    tasks: dict[str, dict[str, Any]] = response.json()
    return next((t for t in tasks.values() if mentioning in (t.get("result") or "")), None)


def test_flower_shows_charges_their_retries_and_the_publishers_results(
    flower: httpx.Client, make_app: Callable[..., Celery], sandbox: SandboxControl
) -> None:
    app = make_app(**SETTINGS)
    # The beat publisher's results reaching Flower prove that the worker's events do.
    first = wait_until(
        lambda: published(flower, "'breakers'"), 30, "a publisher result in Flower", interval=0.1
    )
    assert first["name"] == "breaker.publish_state"

    # Opened before the worker first uses it, so that no cached CLOSED lets the charge through.
    runtime(app).registry.get("payments.card").force_open()
    # Only the ids: a result object left alive would talk to Redis when it is collected.
    deferred = app.send_task("payments.charge", kwargs=charge("ord_flower_1")).id
    straight = app.send_task(
        "payments.charge", kwargs={**charge("ord_flower_2"), "payment_method": "bank"}
    ).id
    done = wait_until(
        lambda: task_info(flower, straight, "SUCCESS"), 20, "the bank charge", interval=0.1
    )
    retried = wait_until(
        lambda: task_info(flower, deferred, "SUCCESS"), 20, "the card charge", interval=0.1
    )
    after = wait_until(
        lambda: published(flower, "'payments.card'"), 10, "the breaker published", interval=0.1
    )

    assert done["name"] == "payments.charge"
    assert done["retries"] == 0
    assert ast.literal_eval(done["result"])["status"] == "succeeded"
    assert retried["name"] == "payments.charge"
    # Flower keeps the retry with the task: when it happened, how many, and that a deferral
    # used no attempt.
    assert retried["retries"] >= 1
    assert retried["retried"] is not None
    assert "Retry in " in retried["exception"]
    assert "deferral 1 (circuit payments.card open): not an attempt" in retried["exception"]
    result = ast.literal_eval(retried["result"])
    assert (result["status"], result["attempts"]) == ("succeeded", 1)
    assert result["deferrals"] >= 1
    assert "'published_at'" in after["result"]
    assert len(sandbox.ledger()["charges"]) == 2
    listed = flower.get("/api/tasks", params={"taskname": "payments.charge"}).json()
    assert {straight, deferred} <= set(listed)


def test_flower_refuses_its_api_without_the_basic_auth_credentials(
    flower_only: httpx.Client
) -> None:
    url = flower_only.base_url.join("/api/tasks")

    assert httpx.get(url, timeout=5).status_code == 401
    assert httpx.get(url, auth=(FLOWER_USER, "wrong"), timeout=5).status_code == 401
    assert flower_only.get("/api/tasks").status_code == 200


def test_the_publisher_shows_in_flower_when_a_breaker_changes_not_at_every_run(
    flower: httpx.Client, make_app: Callable[..., Celery], redis_url: str
) -> None:
    app = make_app(**SETTINGS)
    shown = wait_until(
        lambda: published(flower, "'breakers'"), 30, "a publisher result in Flower", interval=0.1
    )
    ran = redis.Redis.from_url(redis_url)

    def publisher_rows() -> int:
        response = flower.get("/api/tasks", params={"taskname": "breaker.publish_state"})
        return len(response.json())

    # Ten runs (0.5 s interval) with nothing new: the first row stays the only one.
    subscriber = ran.pubsub()
    subscriber.subscribe("breaker:state")
    runs: list[dict[str, Any]] = []

    def ten_runs() -> bool:
        message = subscriber.get_message(timeout=0.5)
        if message and message["type"] == "message":
            runs.append(message)
        return len(runs) >= 10

    wait_until(ten_runs, 30, "ten publications on the channel")
    assert publisher_rows() == 1
    # A breaker opens: a row says so at once, its summary first.
    runtime(app).registry.get("payments.card").force_open()
    opened = wait_until(
        lambda: published(flower, "payments.card OPEN since"), 10, "the opening in Flower",
        interval=0.1,
    )
    subscriber.close()
    ran.close()

    assert opened["uuid"] != shown["uuid"]
    assert opened["result"].startswith("{'summary': 'payments.card OPEN since ")
    # One row per change since: the opening, and perhaps its half-opening and closing.
    assert 2 <= publisher_rows() <= 4
