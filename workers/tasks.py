"""The Celery tasks: `payments.charge` (CONTRACT.md section 3) and `breaker.publish_state` (5)."""

from __future__ import annotations

import json
import time
from typing import Any, NoReturn

from celery import Task, shared_task

from workers.charging import ChargeRun, Progress
from workers.errors import ChargeRescheduled, InvalidCharge
from workers.publication import read_state
from workers.runtime import runtime
from workers.validation import FIELDS, parse_charge


class ChargeTask(Task):  # type: ignore[misc]
    """A charge: acked late, requeued if its worker process is lost, retried on our terms."""

    acks_late = True
    reject_on_worker_lost = True
    # Attempts and deferrals are counted in our own headers: Celery's retry count covers both.
    max_retries = None
    typing = False

    def reschedule(self, countdown: float, headers: dict[str, Any], reason: str) -> NoReturn:
        """Send this charge again after countdown seconds, with its progress in the headers."""
        merged = {**(self.request.headers or {}), **headers}
        raise self.retry(countdown=countdown, headers=merged, exc=ChargeRescheduled(reason))


@shared_task(bind=True, base=ChargeTask, name="payments.charge")
def charge(self: ChargeTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Charge an order once, guarded by the breaker of its payment method."""
    request = parse_charge(_arguments(args, kwargs))
    progress = Progress.from_headers(self.request.headers, now=time.time())
    holder = f"{self.request.id}:{self.request.retries}"
    return ChargeRun(runtime(self.app), self, holder, request, progress).run()


@shared_task(bind=True, name="breaker.publish_state")
def publish_state(self: Task) -> dict[str, Any]:
    """Publish every known breaker's snapshot: Redis channel, Celery event and task result."""
    rt = runtime(self.app)
    state = read_state(rt.registry)
    rt.redis.publish(rt.settings.breaker_state_channel, json.dumps(state))
    self.send_event("breaker-state", **state)
    return state


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return the charge's fields, also when a client sent them positionally."""
    if len(args) > len(FIELDS):
        raise InvalidCharge(f"at most {len(FIELDS)} positional arguments, got {len(args)}")
    named = dict(zip(FIELDS, args, strict=False))
    twice = sorted(set(named) & set(kwargs))
    if twice:
        raise InvalidCharge(f"field(s) given twice: {', '.join(twice)}")
    return {**named, **kwargs}
