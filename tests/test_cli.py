"""`celery -A workers breaker status|reset|open`: output, effects in the store, and errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner

import workers.tasks  # noqa: F401  (registers breaker.publish_state with every app)
from breaker import BreakerRegistry, CircuitState
from tests.dependencies import run_calls
from tests.redis_server import free_port
from workers.cli import breaker
from workers.runtime import runtime

REPO_ROOT = Path(__file__).resolve().parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))

# The CLI and the test's own breakers must agree on their settings: the store computes a
# circuit's retry_after with the settings of whoever reads it, and a snapshot shows them.
TIMEOUT = 5.0
SETTINGS = {
    "breaker_timeout": TIMEOUT, "payment_provider_timeout": 10.0, "payment_charge_deadline": 900.0,
}
OVERRIDES = {"payments.card": {"timeout": 20}}

HEADER = [
    "NAME", "STATE", "RETRY_AFTER", "OPEN_FOR", "CAUSE", "FAILURE_COUNT", "SUCCESS_COUNT",
    "CALLS", "FAILURES",
    "REJECTED", "CLOSED_S", "OPEN_S", "HALF_OPEN_S",
]


def breaker_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `celery -A workers breaker ARGS` as an operator would, with these settings."""
    return subprocess.run(
        [CELERY, "-A", "workers", "breaker", *args],
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )




@pytest.fixture
def app(make_app: Callable[..., Celery]) -> Celery:
    return make_app(**SETTINGS)


@pytest.fixture
def registry(app: Celery) -> BreakerRegistry:
    return runtime(app).registry


@pytest.fixture
def cli_env(redis_url: str) -> dict[str, str]:
    return {"CELERY_BROKER_URL": redis_url, **{k.upper(): str(v) for k, v in SETTINGS.items()}}


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    """Return the status table's rows by breaker name, after the lines saying where it reads."""
    where, _, table = stdout.partition("\n\n")
    assert where.startswith("Breakers and order book: "), stdout
    lines = table.splitlines()
    assert lines[0].split() == HEADER
    return {cells[0]: dict(zip(HEADER, cells, strict=True))
            for cells in (line.split() for line in lines[1:])}


def test_status_prints_a_row_per_breaker_with_state_counts_and_time_in_state(
    registry: BreakerRegistry, cli_env: dict[str, str]
) -> None:
    run_calls(registry.get("payments.card"), successes=1, failures=3)
    run_calls(registry.get("payments.paypal"), successes=2, failures=1)

    result = breaker_cli("status", env=cli_env)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    rows = table_rows(result.stdout)
    assert set(rows) == {"payments.card", "payments.paypal"}
    card, paypal = rows["payments.card"], rows["payments.paypal"]
    assert (card["STATE"], card["CALLS"], card["FAILURES"], card["REJECTED"]) == (
        "open", "4", "3", "0")
    assert 0 < float(card["RETRY_AFTER"].rstrip("s")) <= TIMEOUT
    assert (card["OPEN_FOR"], card["CAUSE"]) == (f"{TIMEOUT:.1f}s", "failures")
    assert float(card["OPEN_S"]) >= 0
    assert (paypal["STATE"], paypal["RETRY_AFTER"], paypal["FAILURE_COUNT"]) == (
        "closed", "0.0s", "1")
    assert (paypal["CALLS"], paypal["FAILURES"]) == ("3", "1")


def test_status_json_prints_the_same_message_as_the_beat_publisher(
    app: Celery, registry: BreakerRegistry, cli_env: dict[str, str]
) -> None:
    run_calls(registry.get("payments.card"), failures=3)
    run_calls(registry.get("payments.paypal"), successes=1)
    # A healthy success is batched for up to a second: send it now, as the next call would.
    registry.store.flush()

    result = breaker_cli("status", "--json", env=cli_env)
    published = app.tasks["breaker.publish_state"].apply().get(timeout=10)

    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert set(printed) == set(published) == {"summary", "published_at", "breakers"}
    assert isinstance(printed["published_at"], float)

    def stable(message: dict[str, Any]) -> list[dict[str, Any]]:
        # Time moves on between the two reads: everything else must be identical.
        return [{k: v for k, v in b.items() if k not in ("retry_after", "seconds_in_state")}
                for b in message["breakers"]]

    assert stable(printed) == stable(published)
    assert [b["name"] for b in printed["breakers"]] == ["payments.card", "payments.paypal"]
    assert printed["breakers"][0]["state"] == "open"
    assert printed["breakers"][0]["transitions"] == {"closed->open": 1}


def test_status_on_a_store_no_breaker_used_yet_says_so(app: Celery, redis_url: str) -> None:
    result = CliRunner().invoke(
        breaker, ["status"], obj=CLIContext(app=app, no_color=True, workdir=None)
    )

    assert result.exit_code == 0, result.output
    assert result.output == (
        f"Breakers and order book: {redis_url}\nBroker: {redis_url}\nResults: {redis_url}\n\n"
        f"No breaker has been used on {redis_url} yet.\n"
    )


def test_reset_closes_an_open_breaker_and_keeps_its_running_totals(
    registry: BreakerRegistry, cli_env: dict[str, str]
) -> None:
    run_calls(registry.get("payments.card"), failures=3)
    card = registry.get("payments.card")
    assert card.state is CircuitState.OPEN

    result = breaker_cli("reset", "payments.card", env=cli_env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "Reset payments.card: was open, now closed.\n"
    snapshot = card.snapshot()
    assert snapshot["state"] == "closed"
    assert snapshot["failures"] == 3
    assert snapshot["transitions"] == {"closed->open": 1, "open->closed": 1}


def test_open_forces_a_breaker_open_for_its_overridden_timeout(
    make_app: Callable[..., Celery], cli_env: dict[str, str]
) -> None:
    registry = runtime(make_app(**SETTINGS, breaker_overrides=OVERRIDES)).registry
    card = registry.get("payments.card")
    card.call(lambda: None)

    result = breaker_cli(
        "open", "payments.card", env={**cli_env, "BREAKER_OVERRIDES": json.dumps(OVERRIDES)}
    )

    assert result.returncode == 0, result.stderr
    said = re.fullmatch(
        r"Opened payments\.card: was closed, now open; calls refused for ([\d.]+)s\.\n",
        result.stdout,
    )
    assert said, result.stdout
    assert TIMEOUT < float(said.group(1)) <= 20.0
    assert card.state is CircuitState.OPEN
    assert TIMEOUT < card.retry_after <= 20.0
    assert card.snapshot()["transitions"] == {"closed->open": 1}


@pytest.mark.parametrize("command", ["reset", "open"])
def test_an_unknown_name_is_a_one_line_error_and_creates_no_breaker(
    command: str, registry: BreakerRegistry, cli_env: dict[str, str], redis_url: str
) -> None:
    registry.get("payments.card").call(lambda: None)

    result = breaker_cli(command, "payments.nope", env=cli_env)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"Error: no breaker named 'payments.nope' on {redis_url} (known: payments.card)"
    ]
    assert registry.store.names() == ["payments.card"]


@pytest.mark.parametrize("args", [["status"], ["reset", "payments.card"]])
def test_an_unreachable_store_is_a_one_line_error_without_traceback(args: list[str]) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"

    result = breaker_cli(*args, env={"CELERY_BROKER_URL": closed})

    assert result.returncode == 69
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: breaker store {closed} unreachable: ")
    assert "Connection refused" in line


def test_an_unreachable_breaker_store_is_reported_without_its_password(
    cli_env: dict[str, str]
) -> None:
    port = free_port()

    result = breaker_cli(
        "open", "payments.card",
        env={**cli_env, "BREAKER_REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0"},
    )

    assert result.returncode == 69
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: breaker store redis://:***@127.0.0.1:{port}/0 unreachable: ")
    assert "hunter2" not in result.stderr
