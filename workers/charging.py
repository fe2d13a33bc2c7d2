"""One run of a charge: the decisions between the breaker, the order book and the provider.

A run goes through a payment's phases, each atomic where it touches Redis: take the order
(`_begin`), settle an earlier attempt whose outcome is unknown (`_settle_pending`), journal
the attempt (`_journal`), call the provider, and record the outcome (`_record`). Every way a
run can end is one of: a result, a reschedule (deferral or retry, through the task's
`reschedule`), or one of the errors in workers.errors. No Redis error leaves a run raw.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Any, NoReturn, Protocol

from breaker import CircuitBreaker, CircuitBreakerOpenError, Permit
from breaker.redis_core import STORE_ERRORS
from workers.errors import ChargeExpired, ChargeFailed, ChargeRejected
from workers.orders import Begin, PendingAttempt, Settled
from workers.policy import (
    BUSY_RETRY_SECONDS,
    RECORD_RETRY_WAITS,
    STALE_RETRY_SECONDS,
    STORE_RETRY_SECONDS,
    backoff,
    deferral,
)
from workers.provider import ProviderAnswer, ProviderFailure, ProviderRejection
from workers.runtime import Runtime
from workers.validation import ChargeRequest

log = logging.getLogger("workers.charges")

# The jitter's generator: one per process, seeded again in a forked pool process (as the
# random module's own is), instead of one seeded from os.urandom for every run.
_RNG = random.Random()
os.register_at_fork(after_in_child=_RNG.seed)


class Rescheduler(Protocol):
    """What a run needs of its Celery task: reschedule itself with new progress headers."""

    def reschedule(self, countdown: float, headers: dict[str, Any], reason: str) -> NoReturn:
        """Send the charge again after countdown seconds; never returns."""

    def delivery_countdown(self, countdown: float) -> float:
        """Return countdown as the broker will wait it (reschedule's countdown)."""

    def park(
        self, breaker: str, deadline: float, headers: dict[str, Any], reason: str,
        countdown: float,
    ) -> NoReturn:
        """Park the charge until breaker admits calls (else reschedule it); never returns."""


@dataclass(frozen=True)
class Progress:
    """What travels with a charge from one run to the next, in its message headers."""

    first_received: float
    attempts: int = 0
    deferrals: int = 0
    maybe_reached: bool = False
    # False for a message that carries no progress yet: its first receipt is in the journal.
    carried: bool = True

    HEADERS = ("pb_first_received", "pb_attempts", "pb_deferrals", "pb_maybe_reached")

    @classmethod
    def from_headers(cls, headers: dict[str, Any] | None, now: float) -> Progress:
        """Return the progress carried by a message, or a fresh one for a first receipt."""
        headers = headers or {}
        if "pb_first_received" not in headers:
            return cls(first_received=now, carried=False)
        try:
            return cls(
                first_received=float(headers["pb_first_received"]),
                attempts=int(headers.get("pb_attempts", 0)),
                deferrals=int(headers.get("pb_deferrals", 0)),
                maybe_reached=bool(headers.get("pb_maybe_reached", False)),
            )
        except (TypeError, ValueError):
            log.warning("Charge progress headers unreadable; counting from the journal")
            return cls(first_received=now, carried=False)

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
        task_id: str,
        holder: str,
        charge: ChargeRequest,
        progress: Progress,
        *,
        redelivered: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.orders = rt.orders
        self.task = task
        self.task_id = task_id
        # Who holds the order while charging: one message of the task, not the task id alone,
        # since a worker that died between sending a reschedule and acking the original
        # brings both back; a redelivery of the same message is the same holder.
        self.holder = holder
        self.charge = charge
        self.progress = progress
        self.redelivered = redelivered
        self.breaker = rt.registry.get(charge.breaker_name)
        self.rng = rng or _RNG
        self.fence = 0
        self.journaled_receipt = False
        # The key whose attempt _begin journaled with the lock, until _call uses it.
        self.journaled_key: str | None = None
        self.expiring = False
        self.deadline = progress.first_received + self.settings.payment_charge_deadline

    def run(self) -> dict[str, Any]:
        """Charge, return an earlier result, reschedule, or raise a charge error."""
        if not self.progress.carried and self.redelivered:
            # A first message back from a dead worker: its deadline started at first receipt.
            self._journal_receipt()
        if time.time() >= self.deadline:
            return self._expire()
        permit = self._admit(self.breaker)
        book = self._begin(permit)
        if book.result is not None:
            if self._unverified(book):
                return self._verify(permit, book)
            permit.release()
            return self._earlier(book)
        if book.pending is not None and book.pending.key != self.charge.idempotency_key:
            done = self._settle_pending(permit, book.pending)
            if done is not None:
                return done
            permit = self._admit(self.breaker)
        return self._attempt(permit, self.charge, self.charge.idempotency_key)

    def park_if_refused(self) -> None:
        """Park the charge if its breaker refuses calls now (never returns then), else return.

        The worker's gate (workers.gate) asks this before the pool: a charge due at its
        deadline, or one its breaker would let through, goes on to be run.
        """
        if time.time() >= self.deadline:
            return
        self._admit(self.breaker).release()

    # Phases.

    def _admit(self, breaker: CircuitBreaker) -> Permit:
        try:
            return breaker.allow()
        except CircuitBreakerOpenError as refused:
            self._park(refused)

    def _begin(self, permit: Permit | None) -> Begin:
        """Take the order; defer if the order book cannot be read or another message has it."""
        try:
            # This charge's attempt is journaled with the lock when nothing stands before
            # it: one round trip instead of two (see _call).
            book = self.orders.begin(
                self.charge.order_id, self.holder, self.task_id, self.charge.idempotency_key,
                time.time(), attempt=self.charge,
            )
        except STORE_ERRORS as exc:
            if permit is not None:
                permit.release()
            self._defer(STORE_RETRY_SECONDS, f"order book unavailable ({_kind(exc)})")
        self.journaled_receipt = True
        self._start_clock(book.first_received)
        self.fence = book.fence
        self._count_calls(book.calls)
        if book.journaled_calls:
            self.journaled_key = self.charge.idempotency_key
            self._count_calls(book.journaled_calls)
        if book.busy_for:
            if permit is not None:
                permit.release()
            self._defer(
                min(book.busy_for, BUSY_RETRY_SECONDS), "another message is charging this order"
            )
        return book

    def _settle_pending(self, permit: Permit, pending: PendingAttempt) -> dict[str, Any] | None:
        """Replay an earlier attempt of the order with its own key before using another key.

        Return the order's result if that attempt charged it, None if it charged nothing.
        """
        log.warning(
            "Charge %s: an earlier attempt (task %s) has an unknown outcome; replaying its key "
            "before charging under this one", self.charge.order_id, pending.task,
        )
        breaker = self.rt.registry.get(pending.request.breaker_name)
        if breaker is not self.breaker:
            permit.release()
            permit = self._admit(breaker)
        try:
            answer = self._call(permit, pending.request, pending.key, own=False)
        except ChargeRejected:
            log.warning(
                "Charge %s: the provider refused the earlier attempt; nothing was charged by it",
                self.charge.order_id,
            )
            return None
        if answer.status == "declined":
            self._record(pending.key, "declined", release=False)
            log.info(
                "Charge %s: the earlier attempt was declined (%s); nothing was charged by it",
                self.charge.order_id, answer.decline_code,
            )
            return None
        return self._succeeded(answer, pending.key)

    def _unverified(self, book: Begin) -> bool:
        """Return True if this charge's own key may have charged and the journal cannot say."""
        if book.own_status in ("unknown", "unsettled"):
            return True
        # No record of the key, yet this charge's messages say an attempt may have reached
        # the provider: the journal lost it (a failover that dropped the last writes).
        return not book.own_status and self.progress.maybe_reached

    def _verify(self, permit: Permit, book: Begin) -> dict[str, Any]:
        """Ask the provider once with this charge's key, so a second charge is seen."""
        key = self.charge.idempotency_key
        try:
            answer = self.rt.provider.charge(self.charge, key)
        except ProviderRejection:
            permit.success()
            self._record(key, "rejected", release=False)
            return self._earlier(book)
        except Exception as exc:
            failure = _as_failure(exc)
            permit.failure(failure)
            log.error(
                "Charge %s: the order succeeded as %s, and this charge's own attempt may have "
                "charged too: the provider could not say (%s). Reconcile order %s.",
                self.charge.order_id, (book.result or {}).get("charge_id"), failure.reason,
                self.charge.order_id,
            )
            return self._earlier(book)
        permit.success()
        if answer.status == "declined":
            self._record(key, "declined", release=False)
            return self._earlier(book)
        return self._succeeded(answer, key, release=False)

    def _attempt(self, permit: Permit, request: ChargeRequest, key: str) -> dict[str, Any]:
        """Make this charge's attempt with key and return its result, or end the run."""
        answer = self._call(permit, request, key, own=True)
        if answer.status == "declined":
            self._record(key, "declined")
            return self._declined(answer)
        return self._succeeded(answer, key)

    def _call(
        self, permit: Permit, request: ChargeRequest, key: str, *, own: bool
    ) -> ProviderAnswer:
        """Journal one attempt and call the provider; a failure or a refusal ends the run."""
        if self.journaled_key == key and self.fence:
            self.journaled_key = None  # journaled by _begin, under the fence still held
        else:
            self._journal(permit, request, key)
        try:
            answer = self.rt.provider.charge(request, key)
        except ProviderRejection as exc:
            permit.success()  # the provider answered: it is up
            self._record(key, "rejected", release=own)
            log.warning("Charge %s rejected by the provider: %s", self.charge.order_id, exc)
            raise ChargeRejected(
                f"order {self.charge.order_id}: the provider refused the charge ({exc}); "
                "fix the request, retrying cannot help"
            ) from None
        except Exception as exc:
            failure = _as_failure(exc)
            permit.failure(failure)
            settled = self._record(key, "unknown" if failure.may_have_reached else "not_reached")
            unknown = failure.may_have_reached or self.progress.maybe_reached
            if settled is not None:
                unknown = settled.status == "unknown"
            self._after_failure(failure, own, unknown)
        permit.success()
        return answer

    def _journal(self, permit: Permit, request: ChargeRequest, key: str) -> None:
        """Record the attempt before it is sent; defer if that cannot be done."""
        try:
            journaled = self.orders.attempt(
                self.charge.order_id, self.holder, self.fence, key, request, self.task_id,
                time.time(),
            )
        except STORE_ERRORS as exc:
            permit.release()
            self._release()
            self._defer(STORE_RETRY_SECONDS, f"order book unavailable ({_kind(exc)})")
        if journaled.kind != "go":
            permit.release()
            self.fence = 0  # the lock is not ours, or no longer
            why = {
                "stale": "another message took over this order",
                "pending": "an earlier attempt of this order is unsettled",
                "done": "this order succeeded meanwhile",
            }[journaled.kind]
            self._defer(STALE_RETRY_SECONDS, why)
        self._count_calls(journaled.calls)

    def _record(
        self,
        key: str,
        outcome: str,
        *,
        charge_id: str | None = None,
        result: dict[str, Any] | None = None,
        release: bool = True,
    ) -> Settled | None:
        """Record an attempt's outcome, trying again for a while: the provider has spoken."""
        for wait in (*RECORD_RETRY_WAITS, None):
            try:
                settled = self.orders.settle(
                    self.charge.order_id, self.holder, self.fence, key, outcome, time.time(),
                    charge_id=charge_id, result=result, release=release,
                )
            except STORE_ERRORS as exc:
                if wait is None:
                    # The attempt stays unsettled in the journal: the next task for this
                    # order replays its key and records what the provider says then.
                    log.error(
                        "Charge %s: the order book did not take the outcome %s%s (%s); "
                        "it stays unsettled and is replayed by the next task for this order",
                        self.charge.order_id, outcome,
                        f" ({charge_id})" if charge_id else "", _kind(exc),
                    )
                    return None
                time.sleep(wait)
            else:
                if release:
                    self.fence = 0
                return settled
        return None

    # Outcomes.

    def _succeeded(
        self, answer: ProviderAnswer, key: str, *, release: bool = True
    ) -> dict[str, Any]:
        result = self._result(answer)
        settled = self._record(
            key, "succeeded", charge_id=answer.charge_id, result=result, release=release
        )
        if settled is None or settled.result is None:
            log.info(
                "Charge %s succeeded (%s) after %d attempt(s), %d deferral(s)",
                self.charge.order_id, answer.charge_id, result["attempts"], result["deferrals"],
            )
            return result
        if settled.new_conflict:
            self._report_conflict(settled, answer)
        stored = dict(settled.result)
        if settled.conflicts:
            stored["duplicate_charges"] = settled.conflicts
        if stored.get("charge_id") == answer.charge_id:
            log.info(
                "Charge %s succeeded (%s) after %d attempt(s), %d deferral(s)",
                self.charge.order_id, answer.charge_id, result["attempts"], result["deferrals"],
            )
        return stored

    def _declined(self, answer: ProviderAnswer) -> dict[str, Any]:
        result = self._result(answer)
        result["decline_code"] = answer.decline_code
        log.info(
            "Charge %s declined (%s) after %d attempt(s), %d deferral(s)",
            self.charge.order_id, answer.decline_code, result["attempts"], result["deferrals"],
        )
        return result

    def _earlier(self, book: Begin) -> dict[str, Any]:
        assert book.result is not None
        result = dict(book.result)
        if book.conflicts:
            result["duplicate_charges"] = book.conflicts
        log.info(
            "Charge %s already succeeded (%s); returning the first result, charging nothing",
            self.charge.order_id, result.get("charge_id"),
        )
        return result

    def _result(self, answer: ProviderAnswer) -> dict[str, Any]:
        return {
            "order_id": self.charge.order_id,
            "status": answer.status,
            "charge_id": answer.charge_id,
            "attempts": self.progress.attempts,
            "deferrals": self.progress.deferrals,
        }

    def _report_conflict(self, settled: Settled, answer: ProviderAnswer) -> None:
        """Make a second charge for one order an incident: ERROR, journal, metric."""
        assert settled.result is not None
        log.error(
            "SECOND CHARGE for order %s: the provider charged %s although the order had "
            "already succeeded as %s; refund %s. Recorded in the order book and counted in "
            "payments_conflicts_total",
            self.charge.order_id, answer.charge_id, settled.result.get("charge_id"),
            answer.charge_id,
        )
        try:
            self.orders.count_conflict(self.charge.order_id, time.time())
        except STORE_ERRORS as exc:
            log.error(
                "Charge %s: the second charge could not be counted (%s); it is in the order "
                "book", self.charge.order_id, _kind(exc),
            )

    def _after_failure(self, failure: ProviderFailure, own: bool, unknown: bool) -> NoReturn:
        p = self.progress = replace(
            self.progress, maybe_reached=self.progress.maybe_reached or failure.may_have_reached
        )
        if self.expiring:
            raise ChargeExpired(
                f"order {self.charge.order_id}: deadline of "
                f"{self.settings.payment_charge_deadline:g}s passed and the provider could not "
                f"confirm ({failure.reason})." + self._unknown_note(unknown)
            )
        limit = self.settings.payment_max_attempts
        if p.attempts >= limit:
            log.error(
                "Charge %s failed: attempt %d/%d: %s; giving up",
                self.charge.order_id, p.attempts, limit, failure.reason,
            )
            raise ChargeFailed(
                f"order {self.charge.order_id}: the provider failed {p.attempts} time(s), last: "
                f"{failure.reason}." + self._unknown_note(unknown)
            )
        wait = backoff(
            p.attempts,
            self.settings.payment_retry_backoff,
            self.settings.payment_retry_backoff_max,
            self.rng,
        )
        what = "attempt" if own else "replay of the earlier attempt"
        self._reschedule(wait, f"{what} {p.attempts}/{limit} failed: {failure.reason}; retrying")

    def _expire(self) -> dict[str, Any]:
        """At the deadline: settle from the journal and the provider, or end; never wait."""
        self.expiring = True
        log.info(
            "Charge %s past its deadline (%gs since first receipt): settling it from the journal",
            self.charge.order_id, time.time() - self.progress.first_received,
        )
        try:
            book = self.orders.begin(
                self.charge.order_id, self.holder, self.task_id, self.charge.idempotency_key,
                time.time(),
            )
        except STORE_ERRORS as exc:
            raise ChargeExpired(
                f"order {self.charge.order_id}: not charged within "
                f"{self.settings.payment_charge_deadline:g}s, and the order book could not be "
                f"read ({_kind(exc)}) to tell whether an attempt reached the provider."
                + self._unknown_note(True)
            ) from None
        self.fence = book.fence
        self._count_calls(book.calls)
        if book.result is not None:
            return self._earlier(book)
        if book.busy_for:
            raise ChargeExpired(
                f"order {self.charge.order_id}: deadline of "
                f"{self.settings.payment_charge_deadline:g}s passed while another message held "
                "the order; that message's result is the order's."
                + self._unknown_note(self.progress.maybe_reached)
            )
        if book.pending is None:
            self._release()
            raise ChargeExpired(
                f"order {self.charge.order_id}: not charged within "
                f"{self.settings.payment_charge_deadline:g}s "
                f"({self.progress.attempts} attempt(s), {self.progress.deferrals} deferral(s)); "
                "no attempt of this order is unsettled: nothing was charged."
            )
        # An attempt may have been processed: ask once more with its key.
        pending = book.pending
        breaker = self.rt.registry.get(pending.request.breaker_name)
        try:
            permit = breaker.allow()
        except CircuitBreakerOpenError:
            self._release()
            raise ChargeExpired(
                f"order {self.charge.order_id}: deadline of "
                f"{self.settings.payment_charge_deadline:g}s passed while circuit "
                f"{breaker.name} refused calls." + self._unknown_note(True)
            ) from None
        if pending.key == self.charge.idempotency_key:
            return self._attempt(permit, pending.request, pending.key)
        done = self._settle_pending(permit, pending)
        if done is not None:
            return done
        raise ChargeExpired(
            f"order {self.charge.order_id}: not charged within "
            f"{self.settings.payment_charge_deadline:g}s; the earlier attempt of this order "
            "settled without a charge: nothing was charged."
        )

    def _unknown_note(self, unknown: bool) -> str:
        if not unknown:
            return " No attempt reached the provider: nothing was charged."
        return (
            " The outcome is UNKNOWN: an attempt may have reached the provider. Reconcile "
            f"order {self.charge.order_id} with the provider before charging it again."
        )

    # Waiting.

    def _park(self, refused: CircuitBreakerOpenError) -> NoReturn:
        """Wait, off every worker, until the refusing breaker admits calls again."""
        why = f"circuit {refused.name} {refused.state.value}"
        countdown = self._countdown(
            deferral(refused.retry_after, self.breaker.config.timeout_seconds, self.rng), why,
            deferral=True,
        )
        log.info(
            "Charge %s deferred (%s) in %.3fs (attempts %d, deferrals %d), parked until "
            "%s lets it through",
            self.charge.order_id, why, countdown, self.progress.attempts, self.progress.deferrals,
            refused.name,
        )
        self.task.park(
            refused.name, self.deadline, self.progress.headers(), self._reason(why, deferral=True),
            countdown,
        )

    def _defer(self, retry_after: float, why: str) -> NoReturn:
        countdown = deferral(retry_after, self.breaker.config.timeout_seconds, self.rng)
        self._reschedule(countdown, why, deferral=True)

    def _reschedule(self, countdown: float, why: str, *, deferral: bool = False) -> NoReturn:
        countdown = self.task.delivery_countdown(self._countdown(countdown, why, deferral=deferral))
        log.info(
            "Charge %s %s in %.3fs (attempts %d, deferrals %d)",
            self.charge.order_id, f"deferred ({why})" if deferral else why, countdown,
            self.progress.attempts, self.progress.deferrals,
        )
        self.task.reschedule(
            countdown, self.progress.headers(), self._reason(why, deferral=deferral)
        )

    def _countdown(self, countdown: float, why: str, *, deferral: bool) -> float:
        """Return the countdown to wait before the next run, or end the charge past its deadline."""
        if deferral:
            self.progress = replace(self.progress, deferrals=self.progress.deferrals + 1)
        self._release()
        if not self.journaled_receipt and not self.progress.carried:
            self._journal_receipt()
        left = self.deadline - time.time()
        if left <= 0:
            # Past the deadline nothing waits: settle or end now.
            self.expiring = True
            raise ChargeExpired(
                f"order {self.charge.order_id}: deadline of "
                f"{self.settings.payment_charge_deadline:g}s passed ({why})."
                + self._unknown_note(self.progress.maybe_reached)
            )
        # Never sleep past the deadline (wake at it and settle the charge then), nor longer
        # than the broker's visibility timeout covers (the breaker is asked again on waking).
        countdown = min(countdown, left + 0.01, self.settings.longest_countdown)
        return round(max(0.0, countdown), 3)

    def _reason(self, why: str, *, deferral: bool) -> str:
        """Say, for Flower's retry line, whether this reschedule used up an attempt."""
        p, limit = self.progress, self.settings.payment_max_attempts
        if deferral:
            return (
                f"order {self.charge.order_id} deferral {p.deferrals} ({why}): not an attempt, "
                f"{p.attempts}/{limit} attempts used"
            )
        return f"order {self.charge.order_id} {why} ({p.deferrals} deferral(s) so far)"

    # Bookkeeping.

    def _journal_receipt(self) -> None:
        """Record (or read back) when this task was first received; the deadline starts there."""
        try:
            first = self.orders.received(self.charge.order_id, self.task_id, time.time())
        except STORE_ERRORS as exc:
            log.warning(
                "Charge %s: first receipt not journaled (%s); its deadline counts from now",
                self.charge.order_id, _kind(exc),
            )
            return
        self.journaled_receipt = True
        self._start_clock(first)

    def _start_clock(self, first_received: float) -> None:
        if first_received < self.progress.first_received or not self.progress.carried:
            self.progress = replace(self.progress, first_received=first_received, carried=True)
            self.deadline = first_received + self.settings.payment_charge_deadline

    def _count_calls(self, calls: int) -> None:
        if calls > self.progress.attempts:
            self.progress = replace(self.progress, attempts=calls)

    def _release(self) -> None:
        if not self.fence:
            return
        fence, self.fence = self.fence, 0
        try:
            self.orders.release(self.charge.order_id, self.holder, fence)
        except STORE_ERRORS as exc:
            # The lock runs out by itself; a later run of this message takes it back.
            log.warning(
                "Charge %s: order lock not freed (%s); it expires in at most %gs",
                self.charge.order_id, _kind(exc), self.orders.lock_ttl,
            )


def _as_failure(exc: Exception) -> ProviderFailure:
    if isinstance(exc, ProviderFailure):
        return exc
    # A plugged-in provider's own error: treat it as the provider failing, maybe after sending.
    return ProviderFailure(f"{type(exc).__name__}: {exc}", may_have_reached=True)


def _kind(exc: BaseException) -> str:
    """Return a Redis error's kind and first words, for a log line without secrets."""
    text = " ".join(str(exc).split())[:80]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
