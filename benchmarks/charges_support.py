"""The charge task without its breaker, for bench_charges to compare payments.charge against.

`bench.charge_unguarded` does what payments.charge does (validation, order book, provider
call, result) with no breaker in the way; the benchmark's worker loads it with
`-I benchmarks.charges_support`.
"""

from __future__ import annotations

import time
from typing import Any

from celery import shared_task

from breaker import CircuitState, Permit
from workers.charging import ChargeRun, Progress
from workers.runtime import runtime
from workers.tasks import ChargeTask, _arguments
from workers.validation import parse_charge

UNGUARDED_TASK = "bench.charge_unguarded"


class UnwatchedPermit(Permit):
    """A permit no breaker handed out: reporting how the call ended records nothing."""

    __slots__ = ()

    def __init__(self) -> None:
        self.state = CircuitState.CLOSED

    def success(self) -> None:
        """Record nothing."""

    def failure(self, exc: BaseException | None = None) -> None:
        """Record nothing."""

    def done(self, exc: BaseException | None = None) -> None:
        """Record nothing."""

    def release(self) -> None:
        """Record nothing."""


class UnguardedRun(ChargeRun):
    """A charge run that never asks the breaker."""

    def run(self) -> dict[str, Any]:
        """Charge, return an earlier result, reschedule, or raise a charge error."""
        if time.time() >= self.deadline:
            return self._expire()
        return self._charge(UnwatchedPermit())


@shared_task(bind=True, base=ChargeTask, name=UNGUARDED_TASK)  # type: ignore[untyped-decorator]
def charge_unguarded(self: ChargeTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Charge an order once, as payments.charge does, without a breaker."""
    request = parse_charge(_arguments(args, kwargs))
    progress = Progress.from_headers(self.request.headers, now=time.time())
    return UnguardedRun(runtime(self.app), self, self.request.id, request, progress).run()
