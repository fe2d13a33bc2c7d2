"""The breaker exporter: /metrics read from the shared store, /health, and `breaker serve`."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from breaker import BreakerRegistry, CircuitBreakerOpenError, CircuitState
from tests.dependencies import run_calls
from tests.redis_server import RedisServer
from tests.waiting import wait_until
from workers.exporter import ExporterServer
from workers.runtime import runtime

REPO_ROOT = Path(__file__).resolve().parents[1]
CELERY = str(Path(sys.executable).with_name("celery"))

# Long enough that an opened circuit stays OPEN for the whole test.
TIMEOUT = 5.0
# Short enough to watch OPEN turn HALF_OPEN within a test.
SHORT_TIMEOUT = 0.3

# (name, labels) -> value for every sample of one scrape.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> tuple[dict[str, str], Samples]:
    """Return the family types and every sample of one GET /metrics."""
    response = httpx.get(f"{url}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    """Return the value of the sample called metric with exactly these labels."""
    return samples[(metric, frozenset(labels.items()))]


def get_health(url: str) -> tuple[int, dict[str, Any]]:
    """Return the status code and JSON body of GET /health."""
    response = httpx.get(f"{url}/health", timeout=5)
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()





@pytest.fixture
def workers_registry(make_app: Callable[..., Celery]) -> BreakerRegistry:
    """Return the breakers as a worker process would use them."""
    return runtime(make_app(breaker_timeout=TIMEOUT)).registry


@pytest.fixture
def exporter(make_app: Callable[..., Celery]) -> Iterator[str]:
    """Serve an exporter of its own app (own store, own connections) on a free port."""
    registry = runtime(make_app(breaker_timeout=TIMEOUT)).registry
    with ExporterServer(registry, "127.0.0.1", 0) as server:
        yield server.url


def test_metrics_expose_every_family_with_its_prometheus_type(
    workers_registry: BreakerRegistry, exporter: str
) -> None:
    run_calls(workers_registry.get("payments.card"), successes=1)
    # A healthy success is batched for up to a second: send it now, as the next call would.
    workers_registry.store.flush()

    types, samples = scrape(exporter)

    assert types == {
        "breaker_store_up": "gauge",
        "breaker_state": "gauge",
        "breaker_calls": "counter",
        "breaker_rejected_calls": "counter",
        "breaker_transitions": "counter",
        "breaker_state_seconds": "counter",
        "breaker_retry_after_seconds": "gauge",
        "breaker_consecutive_failures": "gauge",
        "breaker_consecutive_successes": "gauge",
        "breaker_open_duration_seconds": "gauge",
        "breaker_openings": "counter",
        "breaker_slow_calls": "counter",
        "breaker_window_calls": "gauge",
        "breaker_window_failure_rate": "gauge",
        "breaker_window_slow_call_rate": "gauge",
    }
    assert value(samples, "breaker_store_up") == 1
    assert value(samples, "breaker_open_duration_seconds", name="payments.card") == TIMEOUT
    for cause in ("failures", "failure_rate", "slow_calls", "probe_failed", "retry_after"):
        assert value(samples, "breaker_openings_total", name="payments.card", cause=cause) == 0
    for state in ("closed", "open", "half_open"):
        assert (("breaker_state_seconds_total", frozenset(
            {("name", "payments.card"), ("state", state)})) in samples)
    assert value(samples, "breaker_transitions_total", name="payments.card",
                 from_state="closed", to_state="open") == 0


def test_counters_follow_the_calls_another_process_makes_on_the_store(
    workers_registry: BreakerRegistry, exporter: str
) -> None:
    card = {"name": "payments.card"}
    _, before = scrape(exporter)
    assert value(before, "breaker_store_up") == 1
    assert not [key for key in before if key[0] == "breaker_state"]

    run_calls(workers_registry.get("payments.card"), successes=2, failures=2)
    _, closed = scrape(exporter)
    assert value(closed, "breaker_calls_total", **card, outcome="success") == 2
    assert value(closed, "breaker_calls_total", **card, outcome="failure") == 2
    assert value(closed, "breaker_consecutive_failures", **card) == 2
    assert value(closed, "breaker_state", **card, state="closed") == 1
    assert value(closed, "breaker_state", **card, state="open") == 0

    run_calls(workers_registry.get("payments.card"), failures=1)
    for _ in range(2):
        with pytest.raises(CircuitBreakerOpenError):
            workers_registry.get("payments.card").call(lambda: None)
    # A process counts the calls it refuses from its cached state and hands the count to
    # Redis with its next round trip: this read is that round trip.
    assert workers_registry.get("payments.card").state is CircuitState.OPEN
    _, opened = scrape(exporter)
    assert value(opened, "breaker_calls_total", **card, outcome="failure") == 3
    assert value(opened, "breaker_rejected_calls_total", **card) == 2
    assert value(opened, "breaker_state", **card, state="open") == 1
    assert value(opened, "breaker_state", **card, state="closed") == 0
    assert value(opened, "breaker_transitions_total", **card,
                 from_state="closed", to_state="open") == 1
    assert 0 < value(opened, "breaker_retry_after_seconds", **card) <= TIMEOUT
    assert value(opened, "breaker_consecutive_failures", **card) == 0


def test_a_short_open_period_still_shows_in_the_counters_after_it_ended(
    workers_registry: BreakerRegistry, exporter: str
) -> None:
    card = {"name": "payments.card"}
    breaker = workers_registry.get("payments.card")
    breaker.force_open()
    wait_until(lambda: value(scrape(exporter)[1], "breaker_state_seconds_total", **card,
                           state="open") > 0, 5, "time to accrue in OPEN")
    breaker.reset()

    _, samples = scrape(exporter)

    assert value(samples, "breaker_state", **card, state="closed") == 1
    assert value(samples, "breaker_transitions_total", **card,
                 from_state="closed", to_state="open") == 1
    assert value(samples, "breaker_transitions_total", **card,
                 from_state="open", to_state="closed") == 1
    assert value(samples, "breaker_state_seconds_total", **card, state="open") > 0


def test_half_open_probes_and_recovery_are_counted_and_health_says_open_meanwhile(
    make_app: Callable[..., Celery]
) -> None:
    card = {"name": "payments.card"}
    workers = runtime(make_app(breaker_timeout=SHORT_TIMEOUT)).registry
    exporter_registry = runtime(make_app(breaker_timeout=SHORT_TIMEOUT)).registry
    with ExporterServer(exporter_registry, "127.0.0.1", 0) as server:
        run_calls(workers.get("payments.card"), failures=3)
        wait_until(lambda: value(scrape(server.url)[1], "breaker_state", **card,
                               state="half_open") == 1, 5, "the circuit to turn HALF_OPEN")
        status, body = get_health(server.url)
        assert (status, body["status"], body["breakers"][0]["state"]) == (200, "open", "half_open")

        run_calls(workers.get("payments.card"), successes=2)

        _, samples = scrape(server.url)
        status, body = get_health(server.url)
    assert value(samples, "breaker_state", **card, state="closed") == 1
    for came_from, went_to in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
        assert value(samples, "breaker_transitions_total", **card,
                     from_state=came_from, to_state=went_to) == 1
    assert value(samples, "breaker_calls_total", **card, outcome="success") == 2
    assert value(samples, "breaker_state_seconds_total", **card, state="open") >= SHORT_TIMEOUT
    assert (status, body["status"]) == (200, "ok")


def test_health_is_ok_with_every_snapshot_while_the_breakers_are_closed(
    workers_registry: BreakerRegistry, exporter: str
) -> None:
    assert get_health(exporter) == (200, {"status": "ok", "breakers": []})
    run_calls(workers_registry.get("payments.card"), successes=1)
    # A healthy success is batched for up to a second: send it now, as the next call would.
    workers_registry.store.flush()

    status, body = get_health(exporter)

    assert (status, body["status"]) == (200, "ok")
    [snapshot] = body["breakers"]
    assert {"name", "state", "failure_count", "success_count", "retry_after", "opened_at",
            "calls", "failures", "rejected", "transitions", "seconds_in_state"} <= set(snapshot)
    assert (snapshot["name"], snapshot["state"]) == ("payments.card", "closed")
    assert snapshot["calls"] == 1


def test_health_says_open_with_status_200_once_a_breaker_is_forced_open(
    workers_registry: BreakerRegistry, exporter: str
) -> None:
    workers_registry.get("payments.card").force_open()

    status, body = get_health(exporter)

    assert (status, body["status"]) == (200, "open")
    assert [b["state"] for b in body["breakers"]] == ["open"]


def test_health_is_503_and_metrics_report_the_store_down_while_redis_is_stopped(
    make_app: Callable[..., Celery], spare_redis_server: RedisServer
) -> None:
    on_spare = {"broker_url": spare_redis_server.url, "result_backend": spare_redis_server.url}
    workers = runtime(make_app(breaker_timeout=TIMEOUT, **on_spare)).registry
    exporter_registry = runtime(make_app(breaker_timeout=TIMEOUT, **on_spare)).registry
    with ExporterServer(exporter_registry, "127.0.0.1", 0) as server:
        run_calls(workers.get("payments.card"), successes=1)
        assert get_health(server.url)[0] == 200

        spare_redis_server.stop()
        status, body = get_health(server.url)
        _, samples = scrape(server.url)

        assert (status, body["status"], body["breakers"]) == (503, "unavailable", [])
        assert "Connection refused" in body["error"]
        assert value(samples, "breaker_store_up") == 0
        assert not [key for key in samples if key[0] == "breaker_state"]

        spare_redis_server.start()
        wait_until(lambda: get_health(server.url)[0] == 200, 10, "/health to recover")
        assert value(scrape(server.url)[1], "breaker_store_up") == 1


@pytest.mark.parametrize("path", ["/", "/metricsx", "/health/extra", "/favicon.ico"])
def test_other_paths_are_404(exporter: str, path: str) -> None:
    assert httpx.get(f"{exporter}{path}", timeout=5).status_code == 404


def test_the_exporter_listens_on_127_0_0_1_unless_told_otherwise(
    workers_registry: BreakerRegistry
) -> None:
    with ExporterServer(workers_registry, port=0) as server:
        assert server.address[0] == "127.0.0.1"
        assert httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5).status_code == 200


@pytest.mark.parametrize(("port", "error"), [(-1, "port must be"), (65536, "port must be")])
def test_the_exporter_refuses_a_port_out_of_range(
    workers_registry: BreakerRegistry, port: int, error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        ExporterServer(workers_registry, "127.0.0.1", port)


# `celery -A workers breaker serve`, as an operator or docker-compose runs it.


@pytest.fixture
def serve(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `celery -A workers breaker serve ARGS`; kill whatever is left at teardown."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [CELERY, "-A", "workers", "breaker", "serve", *args],
            env={**os.environ, "CELERY_BROKER_URL": redis_url},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / f"serve-{len(started)}.log").open("w"),
            text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """Return the first line the process prints, failing the test if none comes in time."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            pytest.fail(f"no output from {process.args} within {timeout}s")
    return process.stdout.readline()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_reports_its_url_serves_the_store_and_stops_cleanly_on_a_signal(
    serve: Callable[..., subprocess.Popen[str]],
    workers_registry: BreakerRegistry,
    redis_url: str,
    signum: signal.Signals,
) -> None:
    run_calls(workers_registry.get("payments.card"), failures=3)
    process = serve("--host", "127.0.0.1", "--port", "0")

    line = first_line(process, timeout=30)
    assert line.startswith("Serving breaker metrics at http://127.0.0.1:"), line
    url = line.split()[4].removesuffix("/metrics")
    status, body = get_health(url)
    _, samples = scrape(url)
    process.send_signal(signum)
    returncode = process.wait(timeout=10)

    assert (status, body["status"]) == (200, "open")
    assert value(samples, "breaker_calls_total", name="payments.card", outcome="failure") == 3
    assert returncode == 0
    assert process.stdout is not None
    assert process.stdout.read() == f"Stopped on signal {int(signum)}.\n"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


@pytest.mark.parametrize(("args", "returncode", "message"), [
    (["--port", "65536"], 2, "Invalid value for '--port'"),
    (["--host", ""], 2, "Invalid value for '--host': host must not be empty"),
])
def test_serve_refuses_a_bad_port_or_host_with_a_usage_error(
    serve: Callable[..., subprocess.Popen[str]], tmp_path: Path,
    args: list[str], returncode: int, message: str,
) -> None:
    process = serve(*args)

    assert process.wait(timeout=30) == returncode
    assert message in (tmp_path / "serve-0.log").read_text()


def test_serve_on_a_port_in_use_is_a_one_line_error(
    serve: Callable[..., subprocess.Popen[str]], tmp_path: Path, redis_server: RedisServer
) -> None:
    process = serve("--port", str(redis_server.port))

    assert process.wait(timeout=30) == 1
    assert (tmp_path / "serve-0.log").read_text().splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{redis_server.port}: [Errno 98] Address already in use"
    ]


def test_metrics_show_the_failure_rate_window_and_the_cause_of_each_opening(
    make_app: Callable[..., Celery],
) -> None:
    # Every process of a deployment reads the same settings, the exporter's included.
    overrides = {"payments.card": {"failure_rate_threshold": 0.5, "minimum_calls": 4,
                                   "failure_threshold": 100}}

    def registry() -> BreakerRegistry:
        return runtime(make_app(breaker_timeout=TIMEOUT, breaker_overrides=overrides)).registry

    breakers = registry()
    run_calls(breakers.get("payments.card"), successes=2, failures=1)
    breakers.store.flush()
    with ExporterServer(registry(), "127.0.0.1", 0) as server:
        _, samples = scrape(server.url)
        assert value(samples, "breaker_window_calls", name="payments.card") == 3
        assert value(samples, "breaker_window_failure_rate", name="payments.card") == 0.3333
        run_calls(breakers.get("payments.card"), failures=1)  # 2 of 4: the rate opens it
        _, samples = scrape(server.url)
    assert value(samples, "breaker_openings_total", name="payments.card",
                 cause="failure_rate") == 1
    assert value(samples, "breaker_state", name="payments.card", state="open") == 1
