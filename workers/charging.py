"""One run of a charge: the decisions between the breaker, the order book and the provider.

The task in workers.tasks hands each run here; every way a run can end is one of: a result,
a reschedule (deferral or retry, via Celery's retry), or one of the errors in workers.errors.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Any, NoReturn, Protocol

import redis

from breaker import CircuitBreakerOpenError, Permit
from workers.errors import ChargeExpired, ChargeFailed, ChargeRejected
from workers.policy import backoff, deferral
from workers.provider import ProviderAnswer, ProviderFailure, ProviderRejection
from workers.runtime import Runtime
from workers.validation import ChargeRequest

log = logging.getLogger("workers.charges")

# Countdown when the order book (Redis) cannot be reached: the charge waits, it is not lost.
STORE_RETRY_SECONDS = 2.0


class Rescheduler(Protocol):
    """What a run needs of its Celery task: reschedule itself with new progress headers."""

    def reschedule(self, countdown: float, headers: dict[str, Any], reason: str) -> NoReturn:
        """Send the charge again after countdown seconds; never returns."""


@dataclass(frozen=True)
class Progress:
    """What travels with a charge from one run to the next, in its message headers."""

    first_received: float
    attempts: int = 0
    deferrals: int = 0
    maybe_reached: bool = False

    HEADERS = ("pb_first_received", "pb_attempts", "pb_deferrals", "pb_maybe_reached")

    @classmethod
    def from_headers(cls, headers: dict[str, Any] | None, now: float) -> Progress:
        """Return the progress carried by a message, or a fresh one for a first receipt."""
        headers = headers or {}
        try:
            return cls(
                first_received=float(headers.get("pb_first_received", now)),
                attempts=int(headers.get("pb_attempts", 0)),
                deferrals=int(headers.get("pb_deferrals", 0)),
                maybe_reached=bool(headers.get("pb_maybe_reached", False)),
            )
        except (TypeError, ValueError):
            log.warning("Charge progress headers unreadable; counting from now")
            return cls(first_received=now)

    def headers(self) -> dict[str, Any]:
        """Return the headers that carry this progress to the next run."""
        return {
            "pb_first_received": self.first_received,
            "pb_attempts": self.attempts,
            "pb_deferrals": self.deferrals,
            "pb_maybe_reached": self.maybe_reached,
        }


class ChargeRun:
    """Decide and carry out one run of one charge."""

    def __init__(
        self,
        rt: Runtime,
        task: Rescheduler,
        holder: str,
        charge: ChargeRequest,
        progress: Progress,
        rng: random.Random | None = None,
    ) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.task = task
        # Who holds the order while charging: one message of the task, not the task id alone,
        # since a worker that died between sending a reschedule and acking the original
        # brings both back; a redelivery of the same message is the same holder.
        self.holder = holder
        self.charge = charge
        self.progress = progress
        self.breaker = rt.registry.get(charge.breaker_name)
        self.rng = rng or random.Random()
        self.deadline = progress.first_received + self.settings.payment_charge_deadline

    def run(self) -> dict[str, Any]:
        """Charge, return an earlier result, reschedule, or raise a charge error."""
        if time.time() >= self.deadline:
            return self._expire()
        try:
            permit = self.breaker.allow()
        except CircuitBreakerOpenError as refused:
            self._defer(refused.retry_after, f"circuit {refused.name} {refused.state.value}")
        return self._charge(permit)

    def _charge(self, permit: Permit) -> dict[str, Any]:
        order = self._begin(permit)
        if order is not None:
            return order
        try:
            answer = self._call_provider(permit)
        except ProviderFailure as failure:
            self._after_failure(failure)
        return self._settled(answer)

    def _call_provider(self, permit: Permit) -> ProviderAnswer:
        """Make one attempt and report it on the breaker; raise ProviderFailure if no answer."""
        self.progress = replace(self.progress, attempts=self.progress.attempts + 1)
        try:
            answer = self.rt.provider.charge(self.charge, self.charge.idempotency_key)
        except ProviderRejection as exc:
            permit.success()  # the provider answered: it is up
            self._finish(None)
            log.warning("Charge %s rejected by the provider: %s", self.charge.order_id, exc)
            raise ChargeRejected(
                f"order {self.charge.order_id}: the provider refused the charge ({exc}); "
                "fix the request, retrying cannot help"
            ) from None
        except Exception as exc:
            failure = _as_failure(exc)
            permit.failure(failure)
            self._finish(None)
            raise failure from None
        permit.success()
        return answer

    def _begin(self, permit: Permit | None) -> dict[str, Any] | None:
        """Take the order; return its earlier result if it already succeeded."""
        try:
            begin = self.rt.orders.begin(self.charge.order_id, self.holder)
        except redis.RedisError as exc:
            if permit is not None:
                permit.release()
            self._defer(STORE_RETRY_SECONDS, f"order book unreachable ({type(exc).__name__})")
        if permit is not None and not begin.may_charge:
            permit.release()
        if begin.result is not None:
            log.info(
                "Charge %s already succeeded (%s); returning the first result, charging nothing",
                self.charge.order_id, begin.result.get("charge_id"),
            )
            return begin.result
        if begin.busy_for:
            self._defer(begin.busy_for, "another task is charging this order")
        return None

    def _finish(self, result: dict[str, Any] | None) -> dict[str, Any] | None:
        try:
            return self.rt.orders.finish(self.charge.order_id, self.holder, result)
        except redis.RedisError as exc:
            # The charge is done at the provider; its lock expires by itself. A later task
            # for this order replays the same Idempotency-Key and charges nothing new.
            log.warning(
                "Charge %s: order book unreachable (%s) when storing the outcome",
                self.charge.order_id, type(exc).__name__,
            )
            return result

    def _settled(self, answer: ProviderAnswer) -> dict[str, Any]:
        result: dict[str, Any] = {
            "order_id": self.charge.order_id,
            "status": answer.status,
            "charge_id": answer.charge_id,
            "attempts": self.progress.attempts,
            "deferrals": self.progress.deferrals,
        }
        if answer.status == "declined":
            result["decline_code"] = answer.decline_code
            self._finish(None)
            log.info(
                "Charge %s declined (%s) after %d attempt(s), %d deferral(s)",
                self.charge.order_id, answer.decline_code, result["attempts"], result["deferrals"],
            )
            return result
        stored = self._finish(result) or result
        if stored.get("charge_id") != answer.charge_id:
            log.warning(
                "Charge %s: the order had already succeeded as %s; returning that first result",
                self.charge.order_id, stored.get("charge_id"),
            )
            return stored
        log.info(
            "Charge %s succeeded (%s) after %d attempt(s), %d deferral(s)",
            self.charge.order_id, answer.charge_id, result["attempts"], result["deferrals"],
        )
        return result

    def _after_failure(self, failure: ProviderFailure) -> NoReturn:
        p = self.progress = replace(
            self.progress, maybe_reached=self.progress.maybe_reached or failure.may_have_reached
        )
        limit = self.settings.payment_max_attempts
        if p.attempts >= limit:
            log.error(
                "Charge %s failed: attempt %d/%d: %s; giving up",
                self.charge.order_id, p.attempts, limit, failure.reason,
            )
            raise ChargeFailed(
                f"order {self.charge.order_id}: the provider failed {p.attempts} time(s), last: "
                f"{failure.reason}." + self._unknown_note()
            )
        wait = backoff(
            p.attempts,
            self.settings.payment_retry_backoff,
            self.settings.payment_retry_backoff_max,
            self.rng,
        )
        self._reschedule(
            wait,
            f"attempt {p.attempts}/{limit} failed: {failure.reason}; retrying"
        )

    def _expire(self) -> dict[str, Any]:
        """At the deadline: return a result if the provider has one, else ChargeExpired."""
        order = self._begin(None)
        if order is not None:
            return order
        if not self.progress.maybe_reached:
            self._finish(None)
            raise ChargeExpired(
                f"order {self.charge.order_id}: not charged within "
                f"{self.settings.payment_charge_deadline:g}s "
                f"({self.progress.attempts} attempt(s), {self.progress.deferrals} deferral(s)); "
                "no attempt reached the provider"
            )
        # An earlier attempt may have been processed: ask once more with the same key.
        try:
            permit = self.breaker.allow()
        except CircuitBreakerOpenError:
            self._finish(None)
            raise ChargeExpired(
                f"order {self.charge.order_id}: deadline of "
                f"{self.settings.payment_charge_deadline:g}s passed while circuit "
                f"{self.breaker.name} refused calls." + self._unknown_note()
            ) from None
        try:
            answer = self._call_provider(permit)
        except ProviderFailure as failure:
            raise ChargeExpired(
                f"order {self.charge.order_id}: deadline of "
                f"{self.settings.payment_charge_deadline:g}s passed and the provider could not "
                f"confirm ({failure.reason})." + self._unknown_note()
            ) from None
        return self._settled(answer)

    def _unknown_note(self) -> str:
        if not self.progress.maybe_reached:
            return " No attempt reached the provider: nothing was charged."
        return (
            " The outcome is UNKNOWN: an attempt may have reached the provider. Reconcile "
            f"order {self.charge.order_id} with the provider before charging it again."
        )

    def _defer(self, retry_after: float, why: str) -> NoReturn:
        countdown = deferral(retry_after, self.breaker.config.timeout_seconds, self.rng)
        self.progress = replace(self.progress, deferrals=self.progress.deferrals + 1)
        self._reschedule(countdown, f"deferred ({why})")

    def _reschedule(self, countdown: float, why: str) -> NoReturn:
        # Never sleep past the deadline: wake at it and settle the charge then.
        countdown = round(max(0.0, min(countdown, self.deadline - time.time() + 0.01)), 3)
        log.info(
            "Charge %s %s in %.3fs (attempts %d, deferrals %d)",
            self.charge.order_id, why, countdown, self.progress.attempts, self.progress.deferrals,
        )
        self.task.reschedule(
            countdown, self.progress.headers(), f"order {self.charge.order_id} {why}"
        )


def _as_failure(exc: Exception) -> ProviderFailure:
    if isinstance(exc, ProviderFailure):
        return exc
    # A plugged-in provider's own error: treat it as the provider failing, maybe after sending.
    return ProviderFailure(f"{type(exc).__name__}: {exc}", may_have_reached=True)

