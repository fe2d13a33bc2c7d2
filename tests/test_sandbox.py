"""The sandbox payment provider, over real HTTP: protocol, idempotency, faults, ledger, CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from workers.sandbox import SandboxControl, SandboxServer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(sandbox_server: SandboxServer, sandbox: SandboxControl) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox_server.url, timeout=5.0) as client:
        yield client


def charge_body(
    order_id: str = "ord_1", token: str = "tok_visa", amount: int = 1999
) -> dict[str, Any]:
    return {
        "amount": amount,
        "currency": "usd",
        "source": token,
        "metadata": {"order_id": order_id},
    }


def post_charge(
    client: httpx.Client,
    body: object,
    key: str | None = "idem_1",
    *,
    api_key: str = "sk_test_any",
    timeout: float | None = None,
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post(
        "/v1/charges",
        content=json.dumps(body),
        headers={**headers, "Content-Type": "application/json"},
        timeout=timeout if timeout is not None else client.timeout,
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# Protocol


def test_charge_succeeds_and_is_recorded_in_the_ledger(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    response = post_charge(client, charge_body("ord_1", amount=1999))

    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["id"].startswith("ch_")
    ledger = sandbox.ledger()
    [charge] = ledger["charges"]
    assert charge["id"] == response.json()["id"]
    assert (charge["order_id"], charge["amount"], charge["currency"]) == ("ord_1", 1999, "usd")
    assert ledger["charges_by_order"] == {"ord_1": 1}
    assert ledger["requests"] == {"total": 1, "by_status": {"200": 1}, "in_flight": 0}
    [event] = ledger["events"]
    assert (event["status"], event["order_id"]) == (200, "ord_1")
    assert abs(event["t"] - time.time()) < 60


@pytest.mark.parametrize("token", ["tok_chargeDeclined", "tok_decline_insufficient_funds"])
def test_declining_token_answers_402_card_declined_and_charges_nothing(
    client: httpx.Client, sandbox: SandboxControl, token: str
) -> None:
    response = post_charge(client, charge_body(token=token))

    assert response.status_code == 402
    assert error_of(response)["code"] == "card_declined"
    assert sandbox.ledger()["charges"] == []


def test_reject_token_answers_400_naming_the_source(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    response = post_charge(client, charge_body(token="tok_reject"))

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_request"
    assert "source" in error_of(response)["message"]
    ledger = sandbox.ledger()
    assert ledger["charges"] == []
    assert ledger["requests"]["by_status"] == {"400": 1}


def test_replay_with_the_same_key_returns_the_first_answer_and_charges_once(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    first = post_charge(client, charge_body(), key="idem_same")
    again = post_charge(client, charge_body(), key="idem_same")

    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert again.headers["Idempotent-Replayed"] == "true"
    ledger = sandbox.ledger()
    assert len(ledger["charges"]) == 1
    assert ledger["requests"]["total"] == 2


def test_replayed_decline_returns_the_same_402(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    first = post_charge(client, charge_body(token="tok_chargeDeclined"), key="idem_declined")
    again = post_charge(client, charge_body(token="tok_chargeDeclined"), key="idem_declined")

    assert first.status_code == again.status_code == 402
    assert again.json() == first.json()
    assert sandbox.ledger()["requests"]["by_status"] == {"402": 2}


def test_reusing_a_key_with_a_different_body_is_an_idempotency_error(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    post_charge(client, charge_body(amount=1999), key="idem_reused")
    response = post_charge(client, charge_body(amount=2999), key="idem_reused")

    assert response.status_code == 400
    assert error_of(response)["code"] == "idempotency_error"
    assert len(sandbox.ledger()["charges"]) == 1


def test_requests_without_a_key_are_each_charged(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    first = post_charge(client, charge_body(), key=None)
    second = post_charge(client, charge_body(), key=None)

    assert first.status_code == second.status_code == 200
    assert first.json()["id"] != second.json()["id"]
    assert sandbox.ledger()["charges_by_order"] == {"ord_1": 2}


def _without_metadata() -> dict[str, Any]:
    body = charge_body()
    del body["metadata"]
    return body


def _without_source() -> dict[str, Any]:
    body = charge_body()
    del body["source"]
    return body


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (json.dumps({**charge_body(), "amount": "1999"}).encode(), "amount"),
        (json.dumps({**charge_body(), "amount": True}).encode(), "amount"),
        (json.dumps({**charge_body(), "amount": 0}).encode(), "amount"),
        (json.dumps({**charge_body(), "amount": -5}).encode(), "amount"),
        (json.dumps({**charge_body(), "amount": 19.99}).encode(), "amount"),
        (json.dumps({**charge_body(), "currency": "us"}).encode(), "currency"),
        (json.dumps({**charge_body(), "currency": "us1"}).encode(), "currency"),
        (json.dumps({**charge_body(), "currency": 840}).encode(), "currency"),
        (json.dumps(_without_source()).encode(), "source"),
        (json.dumps({**charge_body(), "source": ""}).encode(), "source"),
        (json.dumps(_without_metadata()).encode(), "metadata"),
        (json.dumps({**charge_body(), "metadata": {}}).encode(), "metadata.order_id"),
        (json.dumps({**charge_body(), "metadata": {"order_id": 7}}).encode(), "metadata.order_id"),
    ],
)
def test_bad_input_is_rejected_naming_the_field_and_only_counted(
    client: httpx.Client, sandbox: SandboxControl, content: bytes, field: str
) -> None:
    response = client.post(
        "/v1/charges",
        content=content,
        headers={"Idempotency-Key": "idem_bad", "Content-Type": "application/json"},
    )

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_request"
    assert error_of(response)["param"] == field
    assert field in error_of(response)["message"]
    ledger = sandbox.ledger()
    assert ledger["charges"] == []
    assert ledger["requests"] == {"total": 1, "by_status": {"400": 1}, "in_flight": 0}


def test_configured_api_key_is_required() -> None:
    with (
        SandboxServer(api_key="sk_test_sandbox") as server,
        httpx.Client(base_url=server.url, timeout=5.0) as client,
        SandboxControl(server.url) as sandbox,
    ):
        missing = client.post("/v1/charges", json=charge_body())
        wrong = post_charge(client, charge_body(), key="idem_a", api_key="sk_test_wrong")
        right = post_charge(client, charge_body(), key="idem_b", api_key="sk_test_sandbox")
        ledger = sandbox.ledger()

    assert missing.status_code == wrong.status_code == 401
    assert error_of(missing)["code"] == error_of(wrong)["code"] == "unauthorized"
    assert right.status_code == 200
    assert len(ledger["charges"]) == 1


def test_unknown_path_is_404_and_wrong_method_is_405_in_json(client: httpx.Client) -> None:
    missing = client.get("/v1/refunds")
    wrong_method = client.get("/v1/charges")

    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert error_of(wrong_method)["code"] == "method_not_allowed"
    assert wrong_method.headers["Allow"] == "POST"


# Faults


def test_down_answers_the_chosen_status_without_charging(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("down")
    unavailable = post_charge(client, charge_body("ord_1"), key="idem_1")
    sandbox.set_faults("down", status=429)
    limited = post_charge(client, charge_body("ord_2"), key="idem_2")
    sandbox.set_faults("ok")
    recovered = post_charge(client, charge_body("ord_1"), key="idem_1")

    assert unavailable.status_code == 503
    assert limited.status_code == 429
    assert recovered.status_code == 200
    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == {"ord_1": 1}
    assert [(e["status"], e["order_id"]) for e in ledger["events"]] == [
        (503, "ord_1"),
        (429, "ord_2"),
        (200, "ord_1"),
    ]


def test_slow_waits_then_charges(client: httpx.Client, sandbox: SandboxControl) -> None:
    sandbox.set_faults("slow", delay=0.3)
    started = time.monotonic()
    response = post_charge(client, charge_body())

    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200
    assert len(sandbox.ledger()["charges"]) == 1


def test_a_request_held_by_a_slow_fault_is_counted_in_flight_until_answered(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("slow", delay=0.5)
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(post_charge(client, charge_body())))
    sender.start()
    deadline = time.monotonic() + 5.0
    while sandbox.ledger()["requests"]["in_flight"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    held = sandbox.ledger()
    sender.join(timeout=10)

    assert held["requests"]["in_flight"] == 1
    assert held["charges"] == []  # counted on arrival, charged after the delay
    assert [a.status_code for a in answers] == [200]
    assert sandbox.ledger()["requests"]["in_flight"] == 0


def test_timeout_holds_the_request_then_answers_504_without_charging(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("timeout", delay=0.5)
    with pytest.raises(httpx.TimeoutException):
        post_charge(client, charge_body(), key="idem_1", timeout=0.1)
    deadline = time.monotonic() + 5.0
    while sandbox.ledger()["requests"]["total"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    sandbox.set_faults("timeout", delay=0.1)
    answered = post_charge(client, charge_body(), key="idem_2")

    assert answered.status_code == 504
    ledger = sandbox.ledger()
    assert ledger["requests"]["by_status"] == {"504": 2}
    assert ledger["charges"] == []


def _flaky_statuses(client: httpx.Client, sandbox: SandboxControl) -> list[int]:
    sandbox.reset()
    sandbox.set_faults("flaky", rate=0.5, seed=1234)
    return [
        post_charge(client, charge_body(f"ord_{n}"), key=f"idem_{n}").status_code for n in range(40)
    ]


def test_flaky_fails_a_seeded_fraction_reproducibly(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    statuses = _flaky_statuses(client, sandbox)
    charged = len(sandbox.ledger()["charges"])

    assert set(statuses) == {200, 503}
    assert charged == statuses.count(200)
    assert _flaky_statuses(client, sandbox) == statuses


def test_lost_response_charges_and_a_retry_returns_the_stored_charge(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("lost_response")
    lost = post_charge(client, charge_body(), key="idem_lost")
    [charge] = sandbox.ledger()["charges"]
    sandbox.set_faults("ok")
    retry = post_charge(client, charge_body(), key="idem_lost")

    assert lost.status_code == 503
    assert retry.status_code == 200
    assert retry.json()["id"] == charge["id"]
    assert sandbox.ledger()["charges_by_order"] == {"ord_1": 1}


def test_faults_round_trip_with_their_settings(sandbox: SandboxControl) -> None:
    chosen = sandbox.set_faults("flaky", rate=0.3, seed=7)

    assert chosen == {"mode": "flaky", "status": 503, "rate": 0.3, "seed": 7}
    assert sandbox.faults() == chosen


@pytest.mark.parametrize(
    ("faults", "field"),
    [
        ({"mode": "broken"}, "mode"),
        ({}, "mode"),
        ({"mode": "down", "status": 200}, "status"),
        ({"mode": "down", "status": 404}, "status"),
        ({"mode": "down", "status": True}, "status"),
        ({"mode": "slow", "delay": -1}, "delay"),
        ({"mode": "timeout", "delay": "30"}, "delay"),
        ({"mode": "flaky", "rate": 1.5}, "rate"),
        ({"mode": "flaky", "seed": "x"}, "seed"),
        ({"mode": "down", "delay": 1}, "delay"),
        ({"mode": "ok", "colour": "red"}, "colour"),
    ],
)
def test_bad_fault_settings_are_refused_naming_the_field(
    client: httpx.Client, sandbox: SandboxControl, faults: dict[str, Any], field: str
) -> None:
    response = client.post("/_sandbox/faults", json=faults)

    assert response.status_code == 400
    assert field in error_of(response)["message"]
    assert sandbox.faults() == {"mode": "ok"}


def test_control_client_raises_the_reason_of_a_refused_fault(sandbox: SandboxControl) -> None:
    with pytest.raises(ValueError, match="rate"):
        sandbox.set_faults("flaky", rate=2)


# Ledger


def test_ledger_and_logs_never_contain_the_token_or_the_key(
    client: httpx.Client, sandbox: SandboxControl, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workers.sandbox")
    secrets = ("tok_secret_4242", "idem_secret_9876", "tok_decline_secret_1111")
    post_charge(client, charge_body(token=secrets[0]), key=secrets[1])
    post_charge(client, charge_body(token=secrets[2]), key="idem_other")
    sandbox.set_faults("lost_response")
    post_charge(client, charge_body(token=secrets[0]), key=secrets[1])

    ledger_text = json.dumps(sandbox.ledger())
    assert "POST /v1/charges 200" in caplog.text
    for secret in secrets:
        assert secret not in ledger_text
        assert secret not in caplog.text


def test_reset_clears_ledger_idempotency_stats_and_faults(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    first = post_charge(client, charge_body(), key="idem_1")
    sandbox.set_faults("down")
    sandbox.reset()

    ledger = sandbox.ledger()
    assert ledger["charges"] == []
    assert ledger["events"] == []
    assert ledger["charges_by_order"] == {}
    assert ledger["requests"] == {"total": 0, "by_status": {}, "in_flight": 0}
    assert sandbox.faults() == {"mode": "ok"}
    again = post_charge(client, charge_body(), key="idem_1")
    assert again.status_code == 200
    assert again.json()["id"] != first.json()["id"]


# Command line


def _sandbox_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "workers.sandbox", *args]


def _sandbox_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "SANDBOX_API_KEY": "sk_test_cli"}


def _wait_until_serving(process: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        assert process.poll() is None, "the sandbox exited before serving"
        try:
            httpx.get(f"{url}/_sandbox/faults", timeout=0.5)
        except httpx.TransportError:
            time.sleep(0.05)
        else:
            return
    pytest.fail("the sandbox did not answer within 10 seconds")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_charges_and_exits_cleanly_on_signal(signum: signal.Signals) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        _sandbox_command("--port", str(port), "--log-level", "warning"),
        cwd=REPO_ROOT,
        env=_sandbox_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_until_serving(process, url)
        with httpx.Client(base_url=url, timeout=5.0) as client:
            refused = post_charge(client, charge_body(), api_key="sk_test_other")
            charged = post_charge(client, charge_body(), api_key="sk_test_cli")
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        process.kill()
        process.wait()

    assert refused.status_code == 401
    assert charged.status_code == 200
    assert process.returncode == 0, stderr
    assert url in stdout


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_cli_refuses_a_bad_port_naming_the_option(port: str) -> None:
    result = subprocess.run(
        _sandbox_command("--port", port),
        cwd=REPO_ROOT,
        env=_sandbox_env(),
        capture_output=True,
        text=True,
        timeout=10,
    )

    assert result.returncode != 0
    assert "--port" in result.stderr


def test_hang_up_charges_then_closes_the_connection_without_a_word(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("hang_up")

    with pytest.raises(httpx.RemoteProtocolError):
        post_charge(client, charge_body(), key="idem_hang")

    ledger = sandbox.ledger()
    assert ledger["charges_by_order"] == {"ord_1": 1}
    assert ledger["requests"]["by_status"] == {"0": 1}  # no answer at all


def test_trickle_charges_then_sends_the_whole_answer_one_byte_at_a_time(
    sandbox_server: SandboxServer, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("trickle", delay=0.001)
    reads: list[int] = []
    with httpx.Client(base_url=sandbox_server.url, timeout=10) as client, client.stream(
        "POST", "/v1/charges", json=charge_body(), headers={"Idempotency-Key": "idem_t"}
    ) as response:
        raw = b""
        for chunk in response.iter_raw():
            reads.append(len(chunk))
            raw += chunk

    assert response.status_code == 200
    assert len(reads) > 10  # the body arrived in many small reads
    assert json.loads(raw)["status"] == "succeeded"
    assert sandbox.ledger()["charges_by_order"] == {"ord_1": 1}


def test_down_sends_the_retry_after_it_is_given(
    client: httpx.Client, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("down", status=429, retry_after=7.2)

    response = post_charge(client, charge_body())

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "8"  # whole seconds, rounded up
    with pytest.raises(ValueError, match="retry_after"):
        sandbox.set_faults("down", retry_after=-1)
