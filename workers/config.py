"""The settings of CONTRACT.md section 6, read once from app.conf and the environment."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from breaker import BreakerConfig
from breaker.connection import parse_url, safe_url
from breaker.registry import validate_overrides
from workers.policy import BUSY_RETRY_SECONDS, STORE_RETRY_SECONDS, deferral_spread

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Broker URL schemes served by kombu's Redis transports, whose unacked messages come back
# after the visibility timeout.
REDIS_BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")


class SettingsError(ValueError):
    """A setting has a value the workers cannot run with."""


@dataclass(frozen=True)
class Settings:
    """Every setting the workers read, validated; durations are seconds."""

    breaker_failure_threshold: int = 3
    breaker_timeout: float = 30.0
    breaker_success_threshold: int = 2
    breaker_half_open_max_calls: int = 2
    breaker_redis_url: str = ""
    # The Sentinel master a sentinel:// breaker_redis_url names; default the broker's.
    breaker_redis_master_name: str = ""
    breaker_publish_interval: float = 5.0
    breaker_state_channel: str = "breaker:state"
    breaker_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Policies beyond ADR-003 (CONTRACT.md section 2); left out, the ADR's behaviour.
    breaker_open_backoff: float = 1.0
    breaker_max_timeout: float | None = None
    breaker_failure_rate_threshold: float | None = None
    breaker_window: float = 30.0
    breaker_minimum_calls: int = 10
    breaker_slow_call_seconds: float | None = None
    breaker_slow_call_rate_threshold: float | None = None
    payment_provider_url: str = "http://127.0.0.1:8099"
    payment_provider_api_key: str = field(default="", repr=False)
    payment_provider_timeout: float = 10.0
    payment_max_attempts: int = 5
    payment_charge_deadline: float = 900.0
    # Not in the contract's table: knobs with defaults that follow from the ones above.
    payment_provider_class: str = "workers.provider:HttpProvider"
    payment_result_ttl: float = 86400.0
    payment_retry_backoff: float = 1.0
    payment_retry_backoff_max: float = 30.0
    # Replicas that must hold the order journal's money writes (WAIT); -1: 1 on a Sentinel
    # store, where a failover loses what was not replicated, else 0.
    payment_journal_replicas: int = -1
    # How often each worker sends again the parked charges their breakers let through.
    payment_release_interval: float = 0.5
    breaker_probe_lease: float = 0.0
    # Options of the connections to the sentinels (e.g. their password), as kombu's
    # broker_transport_options["sentinel_kwargs"], from which they default.
    breaker_redis_sentinel_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def breaker_defaults(self) -> BreakerConfig:
        """Return the settings every breaker starts from."""
        return BreakerConfig(
            failure_threshold=self.breaker_failure_threshold,
            timeout_seconds=self.breaker_timeout,
            success_threshold=self.breaker_success_threshold,
            half_open_max_calls=self.breaker_half_open_max_calls,
            probe_lease_seconds=self.probe_lease,
            open_backoff=self.breaker_open_backoff,
            max_timeout_seconds=self.breaker_max_timeout,
            failure_rate_threshold=self.breaker_failure_rate_threshold,
            window_seconds=self.breaker_window,
            minimum_calls=self.breaker_minimum_calls,
            slow_call_seconds=self.breaker_slow_call_seconds,
            slow_call_rate_threshold=self.breaker_slow_call_rate_threshold,
        )

    @property
    def probe_lease(self) -> float:
        """Return how long a probe slot is held: a whole provider call, plus a margin."""
        return self.breaker_probe_lease or self.payment_provider_timeout + 5.0

    @property
    def longest_breaker_timeout(self) -> float:
        """Return the longest open timeout of any breaker, overrides included."""
        configs = validate_overrides(self.breaker_overrides, self.breaker_defaults)
        return max([self.breaker_timeout, *(c.timeout_seconds for c in configs.values())])

    @property
    def journal_replicas(self) -> int:
        """Return how many replicas must acknowledge a journal write before it counts."""
        if self.payment_journal_replicas >= 0:
            return self.payment_journal_replicas
        return 1 if self.breaker_redis_url.startswith("sentinel://") else 0

    @property
    def order_lock_ttl(self) -> float:
        """Return how long the order lock outlives one provider call's total deadline."""
        return self.payment_provider_timeout + 5.0

    @property
    def longest_countdown(self) -> float:
        """Return the longest countdown a charge gives itself: every reschedule is capped here."""
        open_for = self.longest_breaker_timeout
        return max(
            open_for + deferral_spread(open_for),
            self.payment_retry_backoff_max,
            STORE_RETRY_SECONDS,
            BUSY_RETRY_SECONDS,
        )

    @property
    def visibility_timeout(self) -> float:
        """Return the Redis broker's visibility timeout for these settings.

        Above the longest countdown plus the longest run (a replay of an earlier attempt and
        the charge's own: two provider calls), so a charge waiting on its countdown is not
        redelivered while its worker is alive; 10% and a second more cover queueing.
        """
        longest_run = 2 * self.payment_provider_timeout
        return round((self.longest_countdown + longest_run) * 1.1 + 1.0, 3)


def _integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError(f"{name} must be a whole number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise SettingsError(f"{name} must be {bound}, got {value!r}")
    return value


def _seconds(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SettingsError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise SettingsError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _url(name: str, value: Any, schemes: tuple[str, ...]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{name} must be a URL, got {value!r}")
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise SettingsError(f"{name} must be a {wanted} URL, got {safe_url(value)!r}")
    return str(value)


def _redis_url(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f"{name} must be a URL, got {value!r}")
    try:
        parse_url(value.strip())
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None
    return value.strip()


def _mapping(name: str, value: Any, what: str = "be a mapping of options") -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, Mapping):
        raise SettingsError(f"{name} must {what}, got {value!r}")
    return dict(value)


def _number(name: str, value: Any, low: float, high: float | None = None) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
        raise SettingsError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def _share(name: str, value: Any) -> float:
    share = _number(name, value, 0.0, 1.0)
    if share == 0:
        raise SettingsError(f"{name} must be a share above 0 and at most 1, got {value!r}")
    return share


def _optional(parse: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """Let an empty value (an unset environment variable's "") mean "off"."""
    return lambda name, value: None if value == "" else parse(name, value)


def _text(name: str, value: Any, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise SettingsError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _overrides(name: str, value: Any) -> dict[str, dict[str, Any]]:
    value = _mapping(name, value, "map breaker names to settings")
    try:
        validate_overrides(value, BreakerConfig())
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return {str(k): dict(v) for k, v in value.items()}


def _provider_class(name: str, value: Any) -> str:
    if not isinstance(value, str) or ":" not in value:
        raise SettingsError(f"{name} must be 'module:ClassName', got {value!r}")
    return value


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "breaker_failure_threshold": lambda n, v: _integer(n, v, 1),
    "breaker_timeout": _seconds,
    "breaker_success_threshold": lambda n, v: _integer(n, v, 1),
    "breaker_half_open_max_calls": lambda n, v: _integer(n, v, 1),
    "breaker_redis_url": _redis_url,
    "breaker_redis_master_name": lambda n, v: _text(n, v, allow_empty=True),
    "breaker_publish_interval": _seconds,
    "breaker_state_channel": _text,
    "breaker_overrides": _overrides,
    "breaker_open_backoff": lambda n, v: _number(n, v, 1.0),
    "breaker_max_timeout": _optional(_seconds),
    "breaker_failure_rate_threshold": _optional(_share),
    "breaker_window": _seconds,
    "breaker_minimum_calls": lambda n, v: _integer(n, v, 1),
    "breaker_slow_call_seconds": _optional(_seconds),
    "breaker_slow_call_rate_threshold": _optional(_share),
    "payment_provider_url": lambda n, v: _url(n, v, ("http", "https")),
    "payment_provider_api_key": lambda n, v: _text(n, v, allow_empty=True),
    "payment_provider_timeout": _seconds,
    "payment_max_attempts": lambda n, v: _integer(n, v, 1, 100),
    "payment_charge_deadline": _seconds,
    "payment_provider_class": _provider_class,
    "payment_result_ttl": _seconds,
    "payment_retry_backoff": _seconds,
    "payment_retry_backoff_max": _seconds,
    "payment_journal_replicas": lambda n, v: _integer(n, v, -1, 16),
    "payment_release_interval": _seconds,
    "breaker_probe_lease": lambda n, v: _seconds(n, v, allow_zero=True),
    "breaker_redis_sentinel_kwargs": _mapping,
}

SETTING_NAMES = tuple(f.name for f in fields(Settings))


def read_settings(
    conf: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Settings:
    """Return the settings from conf, each overridden by its upper-case environment variable.

    Raises SettingsError naming the first setting with a bad value.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in SETTING_NAMES:
        source = name
        raw = conf.get(name)
        if name.upper() in environ:
            raw, source = environ[name.upper()], name.upper()
        if raw is None:
            continue
        try:
            values[name] = _PARSERS[name](name, raw)
        except SettingsError as exc:
            where = f" (from the environment variable {source})" if source != name else ""
            raise SettingsError(f"{exc}{where}") from None
    broker_url = _broker_url(conf, environ)
    transport_options = conf.get("broker_transport_options") or {}
    if not values.get("breaker_redis_url"):
        values["breaker_redis_url"] = default_redis_url(broker_url)
    if not values.get("breaker_redis_master_name"):
        values["breaker_redis_master_name"] = str(transport_options.get("master_name") or "")
    if not values.get("breaker_redis_sentinel_kwargs") and isinstance(
        transport_options.get("sentinel_kwargs"), Mapping
    ):
        values["breaker_redis_sentinel_kwargs"] = dict(transport_options["sentinel_kwargs"])
    settings = Settings(**values)
    _check_together(settings)
    return settings


def _broker_url(conf: Mapping[str, Any], environ: Mapping[str, str]) -> object:
    """Return the broker URL Celery will use: CELERY_BROKER_URL wins over the config."""
    return environ.get("CELERY_BROKER_URL") or conf.get("broker_url")


def redis_broker(broker_url: object) -> bool:
    """Return True if broker_url (a URL, ';'-separated URLs or a list) is a Redis-family one."""
    if isinstance(broker_url, list | tuple):
        broker_url = broker_url[0] if broker_url else ""
    if not isinstance(broker_url, str):
        return False
    scheme = urlsplit(broker_url.split(";")[0].strip()).scheme
    return scheme in REDIS_BROKER_SCHEMES


def default_redis_url(broker_url: object) -> str:
    """Return the broker's Redis (the same server, or the same Sentinel master), else local."""
    if isinstance(broker_url, list | tuple):
        broker_url = broker_url[0] if broker_url else ""
    if not isinstance(broker_url, str):
        return DEFAULT_REDIS_URL
    if broker_url.startswith("sentinel://"):
        return broker_url
    first = broker_url.split(";")[0].strip()
    if first.startswith(("redis://", "rediss://")):
        return first
    if first.startswith("redis+socket://"):
        return "unix://" + first.removeprefix("redis+socket://")
    return DEFAULT_REDIS_URL


# The library's names of the policy arguments, and the settings that give them.
_POLICY_SETTINGS = {
    "max_timeout_seconds": "breaker_max_timeout",
    "slow_call_rate_threshold": "breaker_slow_call_rate_threshold",
    "slow_call_seconds": "breaker_slow_call_seconds",
    "timeout_seconds": "breaker_timeout",
}


def _check_together(s: Settings) -> None:
    try:
        s.breaker_defaults  # noqa: B018 - builds, and so validates, the breakers' settings
    except ValueError as exc:
        text = str(exc)
        for argument, setting in _POLICY_SETTINGS.items():
            text = re.sub(rf"(?<![a-z_]){argument}(?![a-z_])", setting, text)
        raise SettingsError(text) from None
    if s.breaker_redis_url.startswith("sentinel://") and not s.breaker_redis_master_name:
        raise SettingsError(
            f"breaker_redis_master_name must name the Sentinel master of breaker_redis_url "
            f"{safe_url(s.breaker_redis_url)!r} (or set broker_transport_options"
            "['master_name'], which it defaults to)"
        )
    if s.payment_result_ttl < s.payment_charge_deadline:
        raise SettingsError(
            f"payment_result_ttl ({s.payment_result_ttl:g}s) must be at least "
            f"payment_charge_deadline ({s.payment_charge_deadline:g}s), so that an order's first "
            "result outlives every retry of its charge"
        )
    if s.visibility_timeout >= s.payment_charge_deadline:
        raise SettingsError(
            f"payment_charge_deadline ({s.payment_charge_deadline:g}s) must be longer than the "
            f"broker visibility timeout these settings need ({s.visibility_timeout:g}s: "
            "the longest breaker_timeout or payment_retry_backoff_max, plus "
            "2 x payment_provider_timeout and a margin), so a charge held by a worker that died "
            "comes back before its deadline"
        )
    if s.breaker_probe_lease and s.breaker_probe_lease < s.payment_provider_timeout:
        raise SettingsError(
            f"breaker_probe_lease ({s.breaker_probe_lease:g}s) must cover a whole provider call "
            f"(payment_provider_timeout {s.payment_provider_timeout:g}s)"
        )
