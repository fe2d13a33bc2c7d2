"""BreakerRegistry: find breakers by name, each with its own settings, on one store."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any

from breaker.circuit import CircuitBreaker, CircuitBreakerListener
from breaker.state import BreakerConfig, check_name
from breaker.store import Store

# Keys accepted in a per-breaker override, as they are spelled in the settings.
OVERRIDE_KEYS = {
    "failure_threshold": "failure_threshold",
    "timeout": "timeout_seconds",
    "success_threshold": "success_threshold",
    "half_open_max_calls": "half_open_max_calls",
    "probe_lease": "probe_lease_seconds",
    "open_backoff": "open_backoff",
    "max_timeout": "max_timeout_seconds",
    "failure_rate_threshold": "failure_rate_threshold",
    "window": "window_seconds",
    "minimum_calls": "minimum_calls",
    "slow_call_seconds": "slow_call_seconds",
    "slow_call_rate_threshold": "slow_call_rate_threshold",
}


class BreakerRegistry:
    """Hand out one CircuitBreaker per name, built with the defaults and that name's overrides."""

    def __init__(
        self,
        store: Store,
        defaults: BreakerConfig | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        is_failure: Callable[[BaseException], bool] | None = None,
        listeners: tuple[CircuitBreakerListener, ...] = (),
    ) -> None:
        self.store = store
        self.defaults = defaults or BreakerConfig()
        self.overrides = validate_overrides(overrides or {}, self.defaults)
        self.is_failure = is_failure
        self.listeners = listeners
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def config_for(self, name: str) -> BreakerConfig:
        """Return the settings of the breaker called name."""
        return self.overrides.get(name, self.defaults)

    def get(self, name: str) -> CircuitBreaker:
        """Return the breaker called name, creating it on first use."""
        breaker = self._breakers.get(name)
        if breaker is not None:
            return breaker
        check_name(name)
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is None:
                breaker = CircuitBreaker(
                    name,
                    **dataclasses.asdict(self.config_for(name)),
                    store=self.store,
                    is_failure=self.is_failure,
                    listeners=self.listeners,
                )
                self._breakers[name] = breaker
        return breaker

    def names(self) -> list[str]:
        """Return every breaker name the store knows, and those made here."""
        return sorted(set(self.store.names()) | set(self._breakers))

    def known(self, name: str) -> bool:
        """Return True if some process has used a breaker called name on this store."""
        return name in self._breakers or name in self.store.names()

    def snapshots(self) -> list[dict[str, Any]]:
        """Return a snapshot of every known breaker, sorted by name."""
        return [self.get(name).snapshot() for name in self.names()]


def validate_overrides(
    overrides: Mapping[str, Mapping[str, Any]], defaults: BreakerConfig
) -> dict[str, BreakerConfig]:
    """Return a BreakerConfig per overridden name, or raise ValueError naming the bad entry."""
    if not isinstance(overrides, Mapping):
        raise ValueError(
            f"breaker_overrides must map breaker names to settings, got {overrides!r}"
        )
    configs: dict[str, BreakerConfig] = {}
    for name, settings in overrides.items():
        try:
            check_name(name)
        except ValueError as exc:
            raise ValueError(f"breaker_overrides: {exc}") from None
        if not isinstance(settings, Mapping):
            raise ValueError(
                f"breaker_overrides[{name!r}] must be a mapping of settings, got {settings!r}"
            )
        unknown = sorted(set(settings) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(
                f"breaker_overrides[{name!r}] has unknown setting(s) {', '.join(unknown)}; "
                f"expected some of {', '.join(OVERRIDE_KEYS)}"
            )
        changes = {OVERRIDE_KEYS[key]: value for key, value in settings.items()}
        try:
            configs[name] = dataclasses.replace(defaults, **changes)
        except ValueError as exc:
            raise ValueError(f"breaker_overrides[{name!r}]: {exc}") from None
    return configs
