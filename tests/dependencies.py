"""Stand-ins for a guarded dependency: how it fails, and calls made through a breaker."""

from __future__ import annotations

import pytest

from breaker import CircuitBreaker


class ProviderDown(Exception):
    """The dependency failed: a breaker failure."""


class Declined(Exception):
    """The dependency answered no: excluded by is_failure, so a breaker success."""


class Interrupted(BaseException):
    """A call cut short before the dependency answered, like KeyboardInterrupt."""


def not_declined(exc: BaseException) -> bool:
    """Count every exception but a decline as a failure (an is_failure)."""
    return not isinstance(exc, Declined)


def provider_down() -> None:
    """Stand in for a dependency that is down."""
    raise ProviderDown("provider down")


def run_calls(cb: CircuitBreaker, successes: int = 0, failures: int = 0) -> None:
    """Make calls through cb: some that succeed, then some that fail."""
    for _ in range(successes):
        cb.call(lambda: None)
    for _ in range(failures):
        with pytest.raises(ProviderDown):
            cb.call(provider_down)
