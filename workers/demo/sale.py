"""The flash sale: orders sent like the web tier sends them, a provider outage, the recovery.

Phases: BURST (the sale opens, a first wave is charged), OUTAGE (the provider answers 503 for
--outage seconds while the rest of the orders arrive), RECOVERY (the provider is back; the
breaker probes and closes), DRAINING (the deferred charges go through), then DONE.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from celery import Celery

from workers.demo.options import DemoOptions
from workers.demo.stack import Stack
from workers.demo.view import LiveView, Status
from workers.demo.watch import BreakerWatch, ResultReader, Tally, tally
from workers.sandbox import Ledger, no_requests

BREAKER = "payments.card"
TICK_SECONDS = 0.1  # breaker sampling: fine enough to date its changes to a tenth of a second
POLL_SECONDS = 0.25  # results, ledger and the live view
# The first wave must be charged within this long, or the outage starts anyway.
BURST_SECONDS = 10.0
PRICES = (499, 999, 1999, 2499, 4999, 7999, 12900)


@dataclass(frozen=True)
class Order:
    """One order of the sale and the id of the task charging it."""

    order_id: str
    amount: int
    task_id: str


@dataclass
class SaleRecord:
    """What happened in the sale: the material of the summary and the timeline."""

    options: DemoOptions
    started_at: float
    orders: list[Order] = field(default_factory=list)
    down_at: float | None = None
    up_at: float | None = None
    ended_at: float = 0.0
    timed_out: bool = False
    results: list[dict[str, Any] | None] = field(default_factory=list)
    ledger: Ledger | None = None
    snapshot: dict[str, Any] | None = None
    changes: list[tuple[float, str]] = field(default_factory=list)
    # (time, charges deferred, charges queued or running), each time the results are read.
    backlog: list[tuple[float, int, int]] = field(default_factory=list)
    phases: list[tuple[float, str]] = field(default_factory=list)
    published: int = 0


def budget_seconds(options: DemoOptions) -> float:
    """Return how long the sale may take before the demo gives up waiting for results."""
    return 45.0 + options.outage + 6 * options.breaker_timeout + options.charges / 10


class Sale:
    """Play one flash sale on a started stack, showing it on a live view."""

    def __init__(self, options: DemoOptions, stack: Stack, view: LiveView) -> None:
        assert stack.settings is not None
        assert stack.sandbox is not None
        self.options = options
        self.stack = stack
        self.sandbox = stack.sandbox
        self.view = view
        self.rng = random.Random(options.seed)
        # Like the web tier: no project import, JSON only, no result backend to send with.
        self.client = Celery("flash-sale-web", broker=stack.redis.url, set_as_current=False)
        self.client.conf.update(task_serializer="json", accept_content=["json"])
        self.results = ResultReader(stack.redis.url)
        self.record = SaleRecord(options, started_at=time.time())
        self.watch = BreakerWatch(stack.settings, BREAKER, self.record.started_at)
        self._subscriber = redis.Redis.from_url(stack.redis.url)
        self._channel = self._subscriber.pubsub(ignore_subscribe_messages=True)
        self._channel.subscribe(stack.settings.breaker_state_channel)
        self.phase = ""
        self.tally = Tally(total=options.charges, to_come=options.charges)
        self.ledger: Ledger | None = None
        self.status: Status | None = None

    def play(self) -> SaleRecord:
        """Run the sale to its end (or its time budget) and return what happened."""
        record = self.record
        first_wave = max(1, math.ceil(self.options.charges / 4))
        deadline = record.started_at + budget_seconds(self.options)
        self._enter("burst")
        self._send(first_wave)
        next_poll = 0.0
        while self.phase != "done":
            now = time.time()
            self.watch.sample(now)
            self._drain_channel()
            if now >= next_poll:
                next_poll = now + POLL_SECONDS
                self._poll(now)
                self._advance(now, first_wave)
                self.status = self._status(now)
                self.view.update(self.status)
            if self.phase != "done" and now >= deadline:
                record.timed_out = True
                break
            time.sleep(max(0.0, TICK_SECONDS - (time.time() - now)))
        record.ended_at = time.time()
        self._poll(record.ended_at)
        self.watch.sample(record.ended_at)
        self._drain_channel()
        self.status = self._status(record.ended_at)
        self.view.finish(self.status)
        record.results = self.results.read([o.task_id for o in record.orders])
        record.ledger = self.ledger
        record.snapshot = self.watch.snapshot
        record.changes = list(self.watch.changes)
        return record

    def _advance(self, now: float, first_wave: int) -> None:
        """Move the sale to its next phase when this one's condition is met."""
        record, options = self.record, self.options
        if self.phase == "burst":
            if self.tally.charged >= first_wave or now >= record.started_at + BURST_SECONDS:
                self.sandbox.set_faults("down", status=503)
                record.down_at = now
                self._enter("outage")
                # The rush goes on: the rest of the orders arrive while the provider is down.
                self._send(options.charges - len(record.orders))
        elif self.phase == "outage":
            if record.down_at is not None and now >= record.down_at + options.outage:
                self.sandbox.set_faults("ok")
                record.up_at = now
                self._enter("recovery")
        elif self.phase == "recovery" and self.watch.state == "closed":
            self._enter("draining")
        if self.phase in ("recovery", "draining") and self.tally.settled:
            self._enter("done")

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.record.phases.append((time.time(), phase))

    def _send(self, count: int) -> None:
        """Enqueue count orders by task name, as the web tier does."""
        with self.client.producer_or_acquire() as producer:
            for _ in range(count):
                order_id = f"sale-{len(self.record.orders) + 1:05d}"
                amount = self.rng.choice(PRICES)
                result = self.client.send_task(
                    "payments.charge",
                    kwargs={
                        "order_id": order_id,
                        "amount": amount,
                        "currency": "usd",
                        "payment_token": "tok_visa",
                    },
                    producer=producer,
                )
                self.record.orders.append(Order(order_id, amount, result.id))

    def _poll(self, now: float) -> None:
        metas = self.results.read([o.task_id for o in self.record.orders])
        # Out of the whole sale, so that the progress bar means the same from the start.
        self.tally = replace(
            tally(metas), total=self.options.charges, to_come=self.options.charges - len(metas)
        )
        self.record.backlog.append(
            (now, self.tally.deferred, self.tally.queued + self.tally.running)
        )
        self.ledger = self.sandbox.ledger()

    def _drain_channel(self) -> None:
        """Count the breaker states beat published: proof that the embedded beat runs."""
        while (message := self._channel.get_message(timeout=0)) is not None:
            if message.get("type") == "message":
                self.record.published += 1

    def _status(self, now: float) -> Status:
        record, snapshot = self.record, self.watch.snapshot
        requests = self.ledger["requests"] if self.ledger else no_requests()
        return Status(
            elapsed=now - record.started_at,
            phase=self.phase,
            phase_note=self._phase_note(now),
            tally=self.tally,
            breaker_state=snapshot["state"] if snapshot else None,
            retry_after=float(snapshot["retry_after"]) if snapshot else 0.0,
            breaker_rejected=int(snapshot["rejected"]) if snapshot else 0,
            provider_calls=requests["total"],
            provider_by_status=dict(requests["by_status"]),
            outage_calls=outage_calls(self.ledger, record.down_at, record.up_at),
        )

    def _phase_note(self, now: float) -> str:
        record = self.record
        if self.phase == "burst":
            return "the sale opens: a first wave of orders, provider up"
        if self.phase == "outage" and record.down_at is not None:
            return (
                f"provider down (HTTP 503): {now - record.down_at:.1f}s "
                f"of {self.options.outage:g}s"
            )
        if self.phase == "recovery":
            return "provider back: the breaker lets probes through, then closes"
        if self.phase == "draining":
            return "breaker closed: the deferred charges go through"
        return "every charge has a result"

    def close(self) -> None:
        """Release the connections the sale opened."""
        self._channel.close()
        self._subscriber.close()
        self.watch.close()
        self.results.close()
        self.client.close()


def outage_calls(ledger: Ledger | None, down_at: float | None, up_at: float | None) -> int:
    """Return how many charge requests reached the provider while it was down."""
    if ledger is None or down_at is None:
        return 0
    end = up_at if up_at is not None else math.inf
    return sum(1 for event in ledger["events"] if down_at <= event["t"] < end)
