"""Settings (CONTRACT.md section 6): app.conf keys, each overridden by its environment variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from workers.celery import create_app
from workers.config import SettingsError, read_settings
from workers.runtime import forget, runtime

REPO_ROOT = Path(__file__).resolve().parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))


def test_every_setting_has_the_default_of_the_contract() -> None:
    settings = read_settings(create_app(broker_url="redis://10.0.0.5:6380/2").conf)

    assert settings.breaker_failure_threshold == 3
    assert settings.breaker_timeout == 30.0
    assert settings.breaker_success_threshold == 2
    assert settings.breaker_half_open_max_calls == 2
    assert settings.breaker_redis_url == "redis://10.0.0.5:6380/2"
    assert settings.breaker_publish_interval == 5.0
    assert settings.breaker_state_channel == "breaker:state"
    assert settings.breaker_overrides == {}
    assert settings.payment_provider_url == "http://127.0.0.1:8099"
    assert settings.payment_provider_api_key == ""
    assert settings.payment_provider_timeout == 10.0
    assert settings.payment_max_attempts == 5
    assert settings.payment_charge_deadline == 900.0


def test_the_breaker_store_defaults_to_local_redis_when_the_broker_is_not_redis() -> None:
    app = create_app(broker_url="amqp://guest@localhost//")
    assert app.conf.breaker_redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BREAKER_FAILURE_THRESHOLD", "7", 7),
        ("BREAKER_TIMEOUT", "0.7", 0.7),
        ("BREAKER_SUCCESS_THRESHOLD", "4", 4),
        ("BREAKER_HALF_OPEN_MAX_CALLS", "3", 3),
        ("BREAKER_REDIS_URL", "redis://10.1.2.3:6379/4", "redis://10.1.2.3:6379/4"),
        ("BREAKER_PUBLISH_INTERVAL", "2.5", 2.5),
        ("BREAKER_STATE_CHANNEL", "shop:breakers", "shop:breakers"),
        ("PAYMENT_PROVIDER_URL", "https://pay.example.com", "https://pay.example.com"),
        ("PAYMENT_PROVIDER_API_KEY", "sk_test_123", "sk_test_123"),
        ("PAYMENT_PROVIDER_TIMEOUT", "2.5", 2.5),
        ("PAYMENT_MAX_ATTEMPTS", "9", 9),
        ("PAYMENT_CHARGE_DEADLINE", "1200", 1200.0),
    ],
)
def test_each_setting_is_read_from_its_environment_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)

    app = create_app()

    name = variable.lower()
    assert app.conf[name] == expected
    assert getattr(read_settings(app.conf), name) == expected


def test_the_environment_wins_over_app_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BREAKER_TIMEOUT", "0.7")
    app = create_app(breaker_timeout=5, breaker_failure_threshold=4)
    assert app.conf.breaker_timeout == 0.7
    assert app.conf.breaker_failure_threshold == 4


def test_a_worker_uses_the_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, make_app: Callable[..., Celery]
) -> None:
    monkeypatch.setenv("BREAKER_TIMEOUT", "0.7")
    monkeypatch.setenv("BREAKER_FAILURE_THRESHOLD", "6")
    monkeypatch.setenv("BREAKER_OVERRIDES", '{"payments.paypal": {"timeout": 6}}')
    app = make_app(breaker_timeout=5)
    try:
        registry = runtime(app).registry
        card = registry.get("payments.card").config
        paypal = registry.get("payments.paypal").config
    finally:
        forget(app)

    assert (card.timeout_seconds, card.failure_threshold) == (0.7, 6)
    # An override changes only what it names; the rest come from the settings.
    assert (paypal.timeout_seconds, paypal.failure_threshold) == (6.0, 6)


def test_breaker_overrides_are_json_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    overrides = {"payments.paypal": {"timeout": 60, "failure_threshold": 5}}
    monkeypatch.setenv("BREAKER_OVERRIDES", json.dumps(overrides))
    assert create_app().conf.breaker_overrides == overrides


def test_the_broker_visibility_timeout_follows_from_the_settings() -> None:
    app = create_app(broker_url="redis://127.0.0.1:6379/0", breaker_timeout=60)
    settings = read_settings(app.conf)
    visibility = app.conf.broker_transport_options["visibility_timeout"]
    assert visibility == settings.visibility_timeout
    # Above the longest countdown plus a provider call, below the deadline.
    assert 60 + settings.payment_provider_timeout < visibility < settings.payment_charge_deadline


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BREAKER_TIMEOUT", "abc"),
        ("BREAKER_TIMEOUT", "0"),
        ("BREAKER_TIMEOUT", "-1"),
        ("BREAKER_TIMEOUT", "nan"),
        ("BREAKER_TIMEOUT", "inf"),
        ("BREAKER_FAILURE_THRESHOLD", "0"),
        ("BREAKER_FAILURE_THRESHOLD", "1.5"),
        ("BREAKER_SUCCESS_THRESHOLD", "0"),
        ("BREAKER_HALF_OPEN_MAX_CALLS", "none"),
        ("BREAKER_REDIS_URL", "http://127.0.0.1:6379"),
        ("BREAKER_PUBLISH_INTERVAL", "soon"),
        ("BREAKER_STATE_CHANNEL", ""),
        ("BREAKER_OVERRIDES", "{not json"),
        ("BREAKER_OVERRIDES", '["payments.paypal"]'),
        ("BREAKER_OVERRIDES", '{"payments.paypal": {"timeout": 0}}'),
        ("BREAKER_OVERRIDES", '{"payments.paypal": {"colour": "red"}}'),
        ("PAYMENT_PROVIDER_URL", "ftp://pay.example.com"),
        ("PAYMENT_PROVIDER_TIMEOUT", "10s"),
        ("PAYMENT_MAX_ATTEMPTS", "0"),
        ("PAYMENT_CHARGE_DEADLINE", "abc"),
    ],
)
def test_a_bad_value_in_the_environment_is_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError) as refused:
        create_app()

    assert variable.lower() in str(refused.value)
    assert variable in str(refused.value)
    with pytest.raises(SettingsError, match=variable):
        read_settings({}, environ={variable: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("breaker_failure_threshold", 0),
        ("breaker_timeout", "abc"),
        ("breaker_half_open_max_calls", True),
        ("payment_provider_timeout", -2),
        ("breaker_overrides", {"payments.paypal": {"success_threshold": 0}}),
    ],
)
def test_a_bad_value_in_app_conf_is_refused_naming_the_setting(name: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=name):
        create_app(**{name: value})


def test_a_deadline_shorter_than_the_visibility_timeout_is_refused() -> None:
    with pytest.raises(SettingsError, match="payment_charge_deadline"):
        create_app(payment_charge_deadline=40)


def test_a_refused_url_never_shows_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BREAKER_REDIS_URL", "http://:hunter2@127.0.0.1:6379")
    with pytest.raises(SettingsError, match="BREAKER_REDIS_URL") as refused:
        create_app()
    assert "hunter2" not in str(refused.value)


def test_the_api_key_is_not_in_the_settings_repr() -> None:
    settings = read_settings({}, environ={"PAYMENT_PROVIDER_API_KEY": "sk_live_topsecret"})
    assert settings.payment_provider_api_key == "sk_live_topsecret"
    assert "sk_live_topsecret" not in repr(settings)


@pytest.mark.parametrize("command", [["worker", "--pool", "solo"], ["beat"]])
def test_a_bad_setting_stops_celery_at_start_with_one_line_naming_it(
    redis_url: str, command: list[str]
) -> None:
    env = {**os.environ, "CELERY_BROKER_URL": redis_url, "BREAKER_TIMEOUT": "abc"}

    done = subprocess.run(
        [CELERY, "-A", "workers", *command],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )

    assert done.returncode != 0
    output = (done.stdout + done.stderr).strip().splitlines()
    assert len(output) == 1, output
    assert "BREAKER_TIMEOUT" in output[0]
    assert "abc" in output[0]
    assert "Traceback" not in done.stderr
