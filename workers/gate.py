"""Park the charges of an open breaker in the worker's main process, before the pool.

Deferred in a pool process, a charge its breaker refuses costs a whole task execution:
the task-started event, the STARTED state, the trace, the Ignore that Celery copies frame by
frame, the result sent back to the main process. Every charge of a flash-sale backlog that
arrives while the provider is down paid that once, which made a deferral dearer than a
charge. The gate decides as a charge arrives instead, in the consumer (ChargeTask.Strategy):

- it looks only at charges of a breaker the releaser last saw OPEN or HALF_OPEN
  (Runtime.refusing), so while every breaker is closed a charge costs the gate one set
  lookup;
- it asks that breaker, in this process, whether the charge may be tried: in OPEN a refusal
  comes from the breaker's own cache (no round trip), in HALF_OPEN from the probe slots (one
  round trip, where the pool would have run the task to be refused), and counts as the
  pool's would. A charge it lets through gives its permit back (a probe slot freed) and goes
  on to the pool, which asks again;
- refused, the charge is parked with the countdown the pool would give it
  (ChargeRun.park_if_refused), shown as a retry (RETRY state, task-received and task-retried
  events) and its message is acked. Otherwise the message goes on to Celery untouched.

The RETRY states are stored in batches, one round trip for those of the last
RETRY_FLUSH_SECONDS (on the worker's event loop; at once where it has none). They are for
display: the park, which is what keeps the charge, is done before the ack, one by one.

A message the gate is not sure of goes on to the pool, which decides with everything it
knows: a redelivered message, one with expires, a revoked one, one past its deadline, one
whose arguments do not parse, one of a breaker that would let it through. When Redis
refuses a park, the gate stands aside for PAUSE_SECONDS, so a broken store does not hold up
the consumer one socket timeout per message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NoReturn

from celery import Celery, Task
from celery.app.task import Context
from celery.app.trace import LOG_RECEIVED
from celery.utils.imports import symbol_by_name
from celery.worker.request import Request
from celery.worker.strategy import default
from kombu.message import Message

from breaker.redis_core import STORE_ERRORS
from workers.charging import ChargeRun, Progress
from workers.errors import ChargeExpired, ChargeRescheduled
from workers.results import store_retries
from workers.runtime import Runtime, runtime
from workers.tasks import Parked, _arguments, park_message, send_retried
from workers.validation import parse_charge

log = logging.getLogger("workers.charges")
# Celery's logger of received messages (celery.worker.strategy).
received_log = logging.getLogger("celery.worker.strategy")

# How long the gate stands aside after Redis refused to park a charge.
PAUSE_SECONDS = 5.0
# RETRY states wait at most this long, or for this many, to be stored together.
RETRY_FLUSH_SECONDS = 0.02
RETRY_BATCH = 200

Handler = Callable[..., Any]


def strategy(task: Task, app: Celery, consumer: Any, **options: Any) -> Handler:
    """Return Celery's message handler for task, with the gate in front of it."""
    handle = default(task, app, consumer, **options)
    gate = Gate(task, app, consumer)

    def task_message_handler(
        message: Message, body: Any, ack: Any, reject: Any, callbacks: Any, **more: Any
    ) -> Any:
        if gate.parks(message):
            return None
        return handle(message, body, ack, reject, callbacks, **more)

    return task_message_handler


class ToThePool(Exception):
    """The gate leaves this charge to the pool."""


class Gate:
    """Park, before the pool, the charges whose breaker refuses calls."""

    def __init__(self, task: Task, app: Celery, consumer: Any) -> None:
        self.task = task
        self.app = app
        self.hostname = consumer.hostname
        self.revoked = consumer.controller.state.revoked
        self.connection_errors = consumer.connection_errors
        self.Request = symbol_by_name(task.Request)
        eventer = consumer.event_dispatcher
        self.eventer = eventer if eventer and eventer.enabled and task.send_events else None
        self.paused_until = 0.0
        self.failed_once = False
        self.retries = RetryStates(task, getattr(consumer, "hub", None))

    def parks(self, message: Message) -> bool:
        """Park message's charge if its breaker refuses it; return True if it did (acked).

        The message is acked here and now, not on the event loop's next turn as Celery's
        ack would: on a Redis broker, a message acked during its delivery is never recorded
        as unacked (workers/broker.py), which saves two round trips per parked charge.
        """
        rt = runtime(self.app)
        if not rt.refusing or time.monotonic() < self.paused_until:
            return False
        try:
            parked = self._park(rt, message)
        except (ToThePool, ChargeExpired):
            return False  # ChargeExpired: the deadline came meanwhile; the pool settles it
        except Exception:
            # A bug here must not stop charges: the pool takes them, and it is said once.
            if not self.failed_once:
                log.exception("The charge gate failed; charges go on to the pool")
                self.failed_once = True
            return False
        if parked:
            message.ack_log_error(log, self.connection_errors)  # type: ignore[no-untyped-call]
        return parked

    def _park(self, rt: Runtime, message: Message) -> bool:
        headers = message.headers or {}
        delivery = message.delivery_info or {}
        if (
            headers.get("expires") or headers.get("id") in self.revoked
            or delivery.get("redelivered") or headers.get("task") != self.task.name
        ):
            return False
        try:
            payload = message.payload
        except Exception:  # content refused or undecodable: Celery reports it
            return False
        if not isinstance(payload, list | tuple) or len(payload) != 3:
            return False  # not protocol 2: Celery converts it
        args, kwargs, _ = payload
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            return False
        try:
            charge = parse_charge(_arguments(tuple(args), kwargs))
        except Exception:  # InvalidCharge, or arguments no charge has
            return False  # the pool fails it with InvalidCharge
        if charge.breaker_name not in rt.refusing:
            return False
        try:
            # The request as the pool would see it, built by the task's own Request class.
            received = self.Request(
                message, app=self.app, hostname=self.hostname, task=self.task,
                connection_errors=self.connection_errors, body=message.body,
                headers=headers, decoded=False, utc=self.app.uses_utc_timezone(),
            )
        except Exception:  # an eta Celery cannot read: Celery reports the message
            return False
        request = received._context
        now = time.time()
        # Parked from here, the charge's clock starts now and travels in its headers.
        progress = replace(Progress.from_headers(request.headers, now), carried=True)
        run = ChargeRun(
            rt, _Parker(self, received), request.id, f"{request.id}:{request.retries}",
            charge, progress,
        )
        try:
            run.park_if_refused()
        except Parked:
            return True
        return False

    def send_event(self, request: Context, type_: str, **fields: Any) -> None:
        """Send a task event for request, as the worker's own would be sent."""
        if self.eventer is not None:
            fields.pop("retry", None)
            self.eventer.send(type_, uuid=request.id, **fields)

    def pause(self, exc: BaseException) -> None:
        """Stand aside for PAUSE_SECONDS: Redis refused a park."""
        self.paused_until = time.monotonic() + PAUSE_SECONDS
        log.warning(
            "The charge gate cannot park charges (%s); charges go on to the pool for %gs",
            type(exc).__name__, PAUSE_SECONDS,
        )


class RetryStates:
    """The RETRY states of charges the gate parked, stored a batch at a time.

    hub: the worker's event loop, on which a batch is stored RETRY_FLUSH_SECONDS after its
    first state; None (a pool without one) stores each state at once. A batch Redis refuses
    is dropped with a warning, once until a batch is stored again: the charges are parked
    all the same, and their next states (STARTED, SUCCESS) are stored as usual.
    """

    def __init__(self, task: Task, hub: Any) -> None:
        self.task = task
        self.hub = hub
        self.waiting: list[tuple[str, BaseException, Context]] = []
        self.failing = False

    def add(self, request: Context, reason: BaseException) -> None:
        """Store RETRY for request's task soon."""
        self.waiting.append((request.id, reason, request))
        if self.hub is None or len(self.waiting) >= RETRY_BATCH:
            self.flush()
        elif len(self.waiting) == 1:
            self.hub.call_later(RETRY_FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Store the waiting states, in one round trip where the backend can."""
        batch, self.waiting = self.waiting, []
        if not batch:
            return
        try:
            store_retries(self.task.backend, batch)
        except Exception as exc:
            if not self.failing:
                log.warning(
                    "RETRY states of %d parked charge(s) not stored (%s); they are parked "
                    "all the same", len(batch), type(exc).__name__,
                )
            self.failing = True
        else:
            if self.failing:
                log.info("RETRY states of parked charges are stored again")
            self.failing = False


class _Parker:
    """The task side of a ChargeRun for the gate: park and show, or leave it to the pool."""

    def __init__(self, gate: Gate, received: Request) -> None:
        self.gate = gate
        self.received = received
        self.request = received._context

    def park(
        self, breaker: str, deadline: float, headers: dict[str, Any], reason: str,
        countdown: float,
    ) -> NoReturn:
        gate, received, request = self.gate, self.received, self.request
        if received.eta is not None:
            # A countdown retry refused before it is due waits at least until then.
            countdown = round(max(countdown, received.eta.timestamp() - time.time()), 3)
        # The task's Request redacted them (RedactedRequest); the parked message reuses them.
        reprs = (received.argsrepr, received.kwargsrepr)
        try:
            park_message(gate.task, request, breaker, deadline, headers, countdown, reprs)
        except STORE_ERRORS as exc:
            gate.pause(exc)
            raise ToThePool() from None
        if received_log.isEnabledFor(logging.INFO):
            # Celery's own line for a message received, as for every other charge.
            context = {"id": received.id, "name": received.name, "args": reprs[0],
                       "kwargs": reprs[1], "eta": received.eta}
            received_log.info(LOG_RECEIVED, context, extra={"data": context})
        if gate.eventer is not None:
            gate.send_event(
                request, "task-received", name=received.name, args=reprs[0],
                kwargs=reprs[1], root_id=received.root_id, parent_id=received.parent_id,
                retries=request.retries, eta=None, expires=None,
            )
        reschedule = ChargeRescheduled(reason)
        gate.retries.add(request, reschedule)
        send_retried(
            request.id, lambda type_, **fields: gate.send_event(request, type_, **fields),
            reschedule, countdown,
        )
        raise Parked()

    def reschedule(self, countdown: float, headers: dict[str, Any], reason: str) -> NoReturn:
        raise ToThePool()

    def delivery_countdown(self, countdown: float) -> float:
        return countdown  # never published from here: reschedule leaves it to the pool

