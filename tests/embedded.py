"""An embedded charging worker for the tests: the app, the lines it logs, its card breaker."""

from __future__ import annotations

import gc
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.result import AsyncResult

from breaker import CircuitBreaker, CircuitBreakerOpenError, Permit
from tests.waiting import LogLines
from workers.runtime import forget, runtime
from workers.sandbox import SandboxControl

ORDER = "ord_1001"
CHARGE: dict[str, Any] = {
    "order_id": ORDER,
    "amount": 1999,
    "currency": "usd",
    "payment_token": "tok_visa",
}
RESULT_WAIT = 20.0
# The worker polls the queue this often (default 1s), and so stops within it.
QUICK_SHUTDOWN = {"polling_interval": 0.1}

DEFERRED = re.compile(
    r"Charge (?P<order>\S+) deferred \((?P<why>.*)\) in (?P<countdown>[\d.]+)s "
    r"\(attempts (?P<attempts>\d+), deferrals (?P<deferrals>\d+)\)"
)
RETRYING = re.compile(
    r"Charge (?P<order>\S+) (?:attempt|replay of the earlier attempt) (?P<attempt>\d+)/"
    r"(?P<limit>\d+) failed: (?P<why>.*); retrying in (?P<countdown>[\d.]+)s"
)


class Worker:
    """An embedded worker's app, with the log lines it wrote and the card breaker it uses."""

    def __init__(self, app: Celery, logs: LogLines) -> None:
        self.app = app
        self.logs = logs

    @property
    def breaker(self) -> CircuitBreaker:
        # Threads pool: the worker's tasks share this process's runtime, and so this breaker.
        return runtime(self.app).registry.get("payments.card")

    def charge(self, headers: dict[str, Any] | None = None, **fields: Any) -> AsyncResult:
        """Enqueue a charge by name, as the web tier does."""
        return self.app.send_task(
            "payments.charge", kwargs={**CHARGE, **fields}, headers=headers
        )


def embedded_workers(make_app: Callable[..., Celery]) -> Iterator[Callable[..., Worker]]:
    """Yield a function that starts an embedded worker on an app with the given settings."""
    with ExitStack() as stack:

        def start(**conf: Any) -> Worker:
            app = make_app(broker_transport_options=QUICK_SHUTDOWN, **conf)
            stack.callback(forget, app)
            stack.enter_context(
                start_worker(
                    app, pool="threads", concurrency=4, perform_ping_check=False,
                    loglevel="INFO",
                )
            )
            # A retry, and pytest.raises, leave AsyncResults in reference cycles; collected,
            # one unsubscribes from the result backend. Collect them while Redis is up: after
            # the session's redis-server has stopped, that is 20 retries a second apart.
            stack.callback(gc.collect)
            # Attached after the worker set up logging, which replaces the root's handlers.
            logs = LogLines(logging.INFO)
            logging.getLogger().addHandler(logs)
            stack.callback(logging.getLogger().removeHandler, logs)
            return Worker(app, logs)

        yield start


def try_allow(breaker: CircuitBreaker) -> Permit | None:
    """Return a permit of breaker, or None while it refuses calls."""
    try:
        return breaker.allow()
    except CircuitBreakerOpenError:
        return None


def ledger_total(sandbox: SandboxControl) -> int:
    """Return how many charge requests reached the sandbox."""
    return sandbox.ledger()["requests"]["total"]
