"""The Celery tasks: `payments.charge` (CONTRACT.md section 3) and `breaker.publish_state` (5)."""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, NoReturn

from celery import Celery, Task, shared_task
from celery.app.task import Context
from celery.canvas import Signature
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.quorum_queues import detect_quorum_queues
from celery.worker.request import Request

from workers.charging import ChargeRun, Progress
from workers.errors import ChargeRescheduled, InvalidCharge
from workers.policy import PUBLISH_RETRY_WAITS
from workers.publication import STORE_ERRORS, StoreUnavailable, read_state
from workers.redaction import charge_reprs
from workers.results import one_trip
from workers.runtime import runtime
from workers.validation import FIELDS, parse_charge

log = logging.getLogger("workers.charges")


class RedactedRequest(Request):  # type: ignore[misc]
    """A charge as the worker shows it (events, inspect, Flower): token and key masked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Whatever repr the client sent, the worker reports its own.
        if isinstance(self._args, list | tuple) and isinstance(self._kwargs, dict):
            self._argsrepr, self._kwargsrepr = charge_reprs(self._args, self._kwargs)

    def info(self, safe: bool = False) -> dict[str, Any]:
        """Describe the request for `inspect active/reserved/scheduled`: reprs, never arguments."""
        described: dict[str, Any] = super().info(safe=True)
        return described


class ChargeTask(Task):  # type: ignore[misc]
    """A charge: acked late, requeued if its worker process is lost, rescheduled on our terms."""

    acks_late = True
    reject_on_worker_lost = True
    # Attempts and deferrals are counted in our own headers: Celery's retry count covers both.
    max_retries = None
    typing = False
    Request = RedactedRequest
    # Charges of a refusing breaker are parked as they arrive, before the pool (workers.gate).
    Strategy = "workers.gate:strategy"

    @property
    def backend(self) -> Any:
        """Return the app's result backend; on Redis one that stores a state in one trip."""
        return one_trip(Task.backend.fget(self))

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    def reschedule(self, countdown: float, headers: dict[str, Any], reason: str) -> NoReturn:
        """Send this charge again after countdown seconds, with its progress in the headers.

        As Task.retry, but a message that cannot be published is never dropped: Task.retry
        turns a publish error into Reject(requeue=False), which acks the original. Here the
        original goes back to the broker, to be delivered again.
        """
        signature = next_message(self, self.request, headers, countdown=countdown)
        error = _publish(signature)
        if error is not None:
            log.error(
                "Charge task %s: its reschedule could not be published (%s: %s); the message "
                "goes back to the broker to be delivered again",
                self.request.id, type(error).__name__, " ".join(str(error).split())[:120],
            )
            raise Reject(error, requeue=True)
        raise Retry(exc=ChargeRescheduled(reason), when=countdown, sig=signature) from None

    def delivery_countdown(self, countdown: float) -> float:
        """Return countdown as the broker will wait it (broker_countdown)."""
        return broker_countdown(self.app, countdown)

    def park(
        self, breaker: str, deadline: float, headers: dict[str, Any], reason: str,
        countdown: float,
    ) -> NoReturn:
        """Park this charge for countdown seconds and until breaker admits calls; ack this.

        Parked, the charge waits in the breaker store (workers.parking), not in a worker; if
        the store cannot take it, it is rescheduled with the countdown instead.
        """
        request = self.request
        try:
            park_message(self, request, breaker, deadline, headers, countdown)
        except STORE_ERRORS as exc:
            log.warning(
                "Charge task %s: cannot park it (%s); rescheduled in %.3fs instead",
                request.id, type(exc).__name__, countdown,
            )
            self.reschedule(countdown, headers, reason)
        show_parked(self, request, self.send_event, reason, countdown)
        raise Parked()


class Parked(Exception):
    """The charge is parked (ChargeTask.park): its message is done, Celery must ignore it."""


def broker_countdown(app: Celery, countdown: float) -> float:
    """Return countdown as the broker can wait it: on native delayed delivery, whole seconds.

    With quorum queues on RabbitMQ, Celery (5.5 to 5.7 at least) sends a countdown message
    through its delayed-delivery exchanges for int(countdown) seconds: a countdown under 1 s
    raises ValueError ("countdown must be a positive number", kombu's calculate_routing_key),
    so no first retry of the default backoff (0.5 to 1 s) could be published, and 5.9 s
    waited 5. Rounded up there, it is published, and never due early. Elsewhere (a Redis
    broker, classic queues) it is kept as it is.
    """
    if countdown <= 0 or countdown == int(countdown):
        return countdown
    transport = app.producer_pool.connections.connection.transport
    if detect_quorum_queues(app, transport.driver_type)[0]:
        return float(math.ceil(countdown))
    return countdown


def next_message(
    task: Task, request: Context, headers: dict[str, Any], countdown: float | None = None,
    reprs: tuple[str, str] | None = None,
) -> Signature:
    """Return a charge's next message: its progress in the headers, reprs redacted.

    reprs: the charge's redacted argsrepr and kwargsrepr, when the caller has them already.
    """
    argsrepr, kwargsrepr = reprs or charge_reprs(request.args or (), request.kwargs or {})
    return task.signature_from_request(
        request,
        countdown=countdown,
        retries=request.retries + 1,
        headers={**(request.headers or {}), **headers},
        argsrepr=argsrepr,
        kwargsrepr=kwargsrepr,
    )


def park_message(
    task: Task, request: Context, breaker: str, deadline: float, headers: dict[str, Any],
    countdown: float, reprs: tuple[str, str] | None = None,
) -> None:
    """Park a charge's next message on breaker for countdown seconds; raise if Redis fails."""
    message = _jsonable(dict(next_message(task, request, headers, reprs=reprs)))
    runtime(task.app).parking.park(breaker, message, time.time() + countdown, deadline)


def show_parked(
    task: Task, request: Context, send_event: Callable[..., Any], reason: str, countdown: float
) -> None:
    """Show a parked charge as a Celery retry would: RETRY in the backend, a retried event.

    Both best effort: the charge is parked, and a backend or monitor missing it costs the
    charge nothing.
    """
    reschedule = ChargeRescheduled(reason)
    try:
        task.backend.mark_as_retry(request.id, reschedule, request=request)
    except Exception as exc:
        log.warning("Charge task %s: RETRY state not stored (%s)", request.id,
                    type(exc).__name__)
    send_retried(request.id, send_event, reschedule, countdown)


def send_retried(
    task_id: str, send_event: Callable[..., Any], reschedule: ChargeRescheduled,
    countdown: float,
) -> None:
    """Send the task-retried event of a parked charge, as Celery's retry would (best effort)."""
    due = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=countdown)
    try:
        send_event(
            "task-retried",
            exception=f"Retry in {countdown:g}s: {reschedule!r}",
            traceback="", eta=due.isoformat(), retry=False,
        )
    except Exception as exc:
        log.warning("Charge task %s: retry event not sent (%s)", task_id, type(exc).__name__)


def _jsonable(value: Any) -> Any:
    """Return value with datetimes as ISO strings, as a signature's options may hold them."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return value


def _publish(signature: Any) -> Exception | None:
    """Publish signature, trying again while the broker refuses; return the last error."""
    for wait in (*PUBLISH_RETRY_WAITS, None):
        try:
            signature.apply_async()
        except Exception as exc:  # any refusal: connection, maxmemory, ACL, ...
            if wait is None:
                return exc
            time.sleep(wait)
        else:
            return None
    return None


@shared_task(bind=True, base=ChargeTask, name="payments.charge")
def charge(self: ChargeTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Charge an order once, guarded by the breaker of its payment method."""
    request = parse_charge(_arguments(args, kwargs))
    task = self.request
    progress = Progress.from_headers(task.headers, now=time.time())
    redelivered = bool((task.delivery_info or {}).get("redelivered"))
    try:
        return ChargeRun(
            runtime(self.app), self, task.id, f"{task.id}:{task.retries}", request, progress,
            redelivered=redelivered,
        ).run()
    except Parked:
        # Raised here, not where the charge was parked: Celery copies every frame of an
        # Ignore's traceback (billiard's ExceptionInfo, twice per Ignore, with each frame's
        # code positions), which made a parked deferral cost more CPU and pool memory than
        # a charge. From here the traceback is Celery's frames and this one.
        raise Ignore() from None


# A publisher row reaches Flower when a breaker's state changes, and at least this often.
FLOWER_EVERY_SECONDS = 60.0
# The states the publisher last showed in Flower; expires after FLOWER_EVERY_SECONDS.
SHOWN_KEY = "breaker:published:shown"


class PublisherTask(Task):  # type: ignore[misc]
    """The beat publisher: no task events of its own, so Flower lists the charges first.

    It runs every breaker_publish_interval; one row every 5 s would fill Flower's task
    list. It sends the events of a row itself when there is something new to show.
    """

    send_events = False


@shared_task(bind=True, base=PublisherTask, name="breaker.publish_state")
def publish_state(self: PublisherTask) -> dict[str, Any]:
    """Publish every known breaker's snapshot: Redis channel, Celery event and task result."""
    rt = runtime(self.app)
    began = time.monotonic()
    try:
        state = read_state(rt.registry)
    except StoreUnavailable as exc:
        _show_in_flower(self, rt.redis, "unavailable", began, error=exc)
        raise
    rt.redis.publish(rt.settings.breaker_state_channel, json.dumps(state))
    self.send_event("breaker-state", **state)
    seen = ",".join(f"{b['name']}={b['state']}" for b in state["breakers"])
    _show_in_flower(self, rt.redis, seen, began, result=state)
    return state


def _show_in_flower(
    task: Task, client: Any, seen: str, began: float, *,
    result: dict[str, Any] | None = None, error: BaseException | None = None,
) -> None:
    """Send the events of a Flower row for this run if the states changed or a minute passed."""
    try:
        if client.get(SHOWN_KEY) == seen.encode():
            return
        client.set(SHOWN_KEY, seen, ex=int(FLOWER_EVERY_SECONDS))
    except STORE_ERRORS:
        pass  # the store is the trouble being shown: show it
    request = task.request
    task.send_event("task-received", name=task.name, args="()", kwargs="{}", retries=0,
                    root_id=request.root_id, parent_id=request.parent_id)
    task.send_event("task-started")
    if error is not None:
        task.send_event("task-failed", exception=repr(error), traceback="")
    else:
        task.send_event("task-succeeded", result=repr(result),
                        runtime=round(time.monotonic() - began, 6))


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return the charge's fields, also when a client sent them positionally."""
    if len(args) > len(FIELDS):
        raise InvalidCharge(f"at most {len(FIELDS)} positional arguments, got {len(args)}")
    named = dict(zip(FIELDS, args, strict=False))
    twice = sorted(set(named) & set(kwargs))
    if twice:
        raise InvalidCharge(f"field(s) given twice: {', '.join(twice)}")
    return {**named, **kwargs}
