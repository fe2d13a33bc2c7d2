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


@pytest.mark.parametrize(
    ("broker_url", "transport"),
    [
        ("redis://10.0.0.5:6379/0", "workers.broker:Transport"),
        ("rediss://:pw@cache.example.com:6380/0", "workers.broker:Transport"),
        ("redis+socket:///run/redis/redis.sock", "workers.broker:Transport"),
        ("redis://10.0.0.5:6379/0;redis://10.0.0.6:6379/0", "workers.broker:Transport"),
        ("sentinel://10.0.0.7:26379;sentinel://10.0.0.8:26379/0",
         "workers.broker:SentinelTransport"),
    ],
)
def test_every_redis_family_broker_gets_a_visibility_timeout_above_every_countdown(
    broker_url: str, transport: str
) -> None:
    app = create_app(
        broker_url=broker_url, breaker_timeout=45,
        broker_transport_options={"master_name": "pay"},
    )
    settings = read_settings(app.conf)
    options = app.conf.broker_transport_options

    assert options["visibility_timeout"] == settings.visibility_timeout
    assert app.conf.broker_transport == transport
    # Every countdown the task can give itself is capped at longest_countdown; a run after
    # it makes at most two provider calls.
    assert settings.longest_countdown >= 45 + 4.5  # the breaker timeout and its spread
    assert settings.longest_countdown >= settings.payment_retry_backoff_max
    assert options["visibility_timeout"] > (
        settings.longest_countdown + 2 * settings.payment_provider_timeout
    )
    assert options["visibility_timeout"] < settings.payment_charge_deadline


def test_a_broker_that_is_not_redis_gets_no_visibility_timeout_nor_our_transport() -> None:
    app = create_app(broker_url="amqp://guest@localhost//")

    assert "visibility_timeout" not in (app.conf.broker_transport_options or {})
    assert app.conf.broker_transport is None
    assert app.conf.result_backend is None


def test_results_default_to_a_redis_broker_so_the_web_tier_gets_an_answer() -> None:
    assert create_app(broker_url="redis://10.0.0.5:6379/3").conf.result_backend == (
        "redis://10.0.0.5:6379/3"
    )
    kept = create_app(broker_url="redis://10.0.0.5:6379/3", result_backend="rpc://")
    assert kept.conf.result_backend == "rpc://"


def test_a_sentinel_broker_is_followed_by_the_breakers_and_the_results() -> None:
    url = "sentinel://10.0.0.7:26379;sentinel://10.0.0.8:26379/2"
    app = create_app(
        broker_url=url,
        broker_transport_options={"master_name": "payments", "sentinel_kwargs": {"password": "s"}},
    )
    settings = read_settings(app.conf)

    assert settings.breaker_redis_url == url
    assert settings.breaker_redis_master_name == "payments"
    assert settings.breaker_redis_sentinel_kwargs == {"password": "s"}
    assert app.conf.result_backend == url
    assert app.conf.result_backend_transport_options["master_name"] == "payments"


def test_a_sentinel_breaker_store_without_a_master_name_is_refused_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match="breaker_redis_master_name"):
        create_app(broker_url="amqp://guest@localhost//",
                   breaker_redis_url="sentinel://:pw@10.0.0.7:26379/0")


@pytest.mark.parametrize(
    "url",
    ["redis+cluster://10.0.0.1:7000,10.0.0.2:7001", "unix:///run/redis.sock?db=2",
     "sentinel://10.0.0.7:26379/0"],
)
def test_the_breaker_store_takes_cluster_sentinel_and_unix_urls(url: str) -> None:
    app = create_app(breaker_redis_url=url, breaker_redis_master_name="payments")
    assert read_settings(app.conf).breaker_redis_url == url


CONFIG_MODULE = '''
broker_url = "{broker}"
result_backend = "{backend}"
worker_prefetch_multiplier = 7
breaker_timeout = 12.5
payment_provider_url = "http://payments.internal:8099"
'''


def app_from_config_module(
    tmp_path: Path, env: dict[str, str], module: str = CONFIG_MODULE
) -> dict[str, Any]:
    """Import workers.celery in a fresh process with a config module; return what it set."""
    (tmp_path / "shopconfig.py").write_text(
        module.format(broker="redis://10.9.9.9:6379/4", backend="redis://10.9.9.9:6379/5")
    )
    probe = (
        "import json; from workers.celery import app; c = app.conf; "
        "print(json.dumps({k: c[k] if k not in ('broker_url', 'result_backend') else "
        "getattr(c, k) for k in ('broker_url', 'result_backend', 'worker_prefetch_multiplier', "
        "'breaker_timeout', 'payment_provider_url', 'breaker_redis_url')}))"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "BREAKER_"))}
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60, env={**clean, "PYTHONPATH": str(tmp_path),
                         "CELERY_CONFIG_MODULE": "shopconfig", **env},
    )
    assert done.returncode == 0, done.stderr
    loaded: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return loaded


def test_a_config_module_is_honoured_for_every_setting_broker_and_results_included(
    tmp_path: Path,
) -> None:
    conf = app_from_config_module(tmp_path, {})

    assert conf == {
        "broker_url": "redis://10.9.9.9:6379/4",
        "result_backend": "redis://10.9.9.9:6379/5",
        "worker_prefetch_multiplier": 7,
        "breaker_timeout": 12.5,
        "payment_provider_url": "http://payments.internal:8099",
        "breaker_redis_url": "redis://10.9.9.9:6379/4",
    }


def test_the_environment_wins_over_a_config_module(tmp_path: Path) -> None:
    conf = app_from_config_module(tmp_path, {
        "CELERY_BROKER_URL": "redis://10.1.1.1:6379/0",
        "CELERY_RESULT_BACKEND": "redis://10.1.1.1:6379/1",
        "BREAKER_TIMEOUT": "3",
    })

    assert conf["broker_url"] == "redis://10.1.1.1:6379/0"
    assert conf["result_backend"] == "redis://10.1.1.1:6379/1"
    assert conf["breaker_timeout"] == 3.0
    assert conf["breaker_redis_url"] == "redis://10.1.1.1:6379/0"
    assert conf["payment_provider_url"] == "http://payments.internal:8099"


def test_a_worker_holds_at_most_a_bounded_number_of_countdown_tasks() -> None:
    assert create_app(broker_url="redis://10.0.0.5:6379/0").conf.worker_eta_task_limit == 1000
    chosen = create_app(broker_url="redis://10.0.0.5:6379/0", worker_eta_task_limit=50)
    assert chosen.conf.worker_eta_task_limit == 50
