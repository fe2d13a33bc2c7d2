"""HttpProvider over real HTTP: how each answer of CONTRACT.md section 4 maps, and what it sends."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.redis_server import free_port
from tests.waiting import wait_until
from workers.config import Settings
from workers.provider import (
    HttpProvider,
    ProviderAnswer,
    ProviderFailure,
    ProviderRejection,
    load_provider,
    retry_after,
)
from workers.sandbox import SandboxControl, SandboxServer
from workers.validation import ChargeRequest, parse_charge

API_KEY = "sk_test_provider_key"


def request(token: str = "tok_visa", order_id: str = "ord_1001") -> ChargeRequest:
    return parse_charge(
        {"order_id": order_id, "amount": 1999, "currency": "usd", "payment_token": token}
    )


@pytest.fixture
def connect() -> Iterator[Callable[..., HttpProvider]]:
    """Return a function that makes an HttpProvider for a URL; closes them all afterwards."""
    made: list[HttpProvider] = []

    def connect(url: str, api_key: str = "", timeout: float = 2.0) -> HttpProvider:
        provider = HttpProvider(
            Settings(
                payment_provider_url=url,
                payment_provider_api_key=api_key,
                payment_provider_timeout=timeout,
            )
        )
        made.append(provider)
        return provider

    yield connect
    for provider in made:
        provider.close()


@pytest.fixture
def provider(
    connect: Callable[..., HttpProvider], sandbox_server: SandboxServer, sandbox: SandboxControl
) -> HttpProvider:
    return connect(sandbox_server.url)



def test_a_charge_the_provider_accepts_is_a_succeeded_answer(
    provider: HttpProvider, sandbox: SandboxControl
) -> None:
    answer = provider.charge(request(), "idem_1")

    [charge] = sandbox.ledger()["charges"]
    assert answer == ProviderAnswer("succeeded", charge_id=charge["id"])
    assert (charge["order_id"], charge["amount"], charge["currency"]) == ("ord_1001", 1999, "usd")


def test_a_declined_card_is_a_declined_answer(
    provider: HttpProvider, sandbox: SandboxControl
) -> None:
    answer = provider.charge(request("tok_chargeDeclined"), "idem_1")

    assert answer == ProviderAnswer("declined", charge_id=None, decline_code="card_declined")
    assert sandbox.ledger()["charges"] == []


def test_a_refused_request_is_a_rejection_with_its_status_and_code(
    provider: HttpProvider,
) -> None:
    with pytest.raises(ProviderRejection) as rejected:
        provider.charge(request("tok_reject"), "idem_1")

    assert rejected.value.status_code == 400
    assert rejected.value.code == "invalid_request"


def test_rate_limiting_is_a_failure_that_did_not_reach_the_provider(
    provider: HttpProvider, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("down", status=429)

    with pytest.raises(ProviderFailure) as failed:
        provider.charge(request(), "idem_1")

    assert failed.value.may_have_reached is False
    assert "429" in failed.value.reason


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_server_error_is_a_failure_that_may_have_reached_the_provider(
    provider: HttpProvider, sandbox: SandboxControl, status: int
) -> None:
    sandbox.set_faults("down", status=status)

    with pytest.raises(ProviderFailure) as failed:
        provider.charge(request(), "idem_1")

    assert failed.value.may_have_reached is True
    assert failed.value.reason == f"HTTP {status}"


def test_a_lost_answer_is_a_failure_whose_charge_may_have_been_made(
    provider: HttpProvider, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("lost_response")

    with pytest.raises(ProviderFailure) as failed:
        provider.charge(request(), "idem_1")

    assert failed.value.may_have_reached is True
    assert sandbox.ledger()["charges_by_order"] == {"ord_1001": 1}


def test_no_answer_in_time_is_a_failure_that_may_have_reached_the_provider(
    connect: Callable[..., HttpProvider], sandbox_server: SandboxServer, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("slow", delay=0.6)
    provider = connect(sandbox_server.url, timeout=0.2)

    with pytest.raises(ProviderFailure) as failed:
        provider.charge(request(), "idem_1")

    assert failed.value.may_have_reached is True
    assert "no answer in time" in failed.value.reason
    # The provider did charge after the client gave up: why the outcome is unknown.
    wait_until(lambda: sandbox.ledger()["requests"]["total"] == 1, 5, "the slow charge to end")
    assert sandbox.ledger()["charges_by_order"] == {"ord_1001": 1}


def test_connection_refused_is_a_failure_that_did_not_reach_the_provider(
    connect: Callable[..., HttpProvider],
) -> None:
    provider = connect(f"http://127.0.0.1:{free_port()}")

    with pytest.raises(ProviderFailure) as failed:
        provider.charge(request(), "idem_1")

    assert failed.value.may_have_reached is False


def test_the_same_idempotency_key_replays_the_first_charge(
    provider: HttpProvider, sandbox: SandboxControl
) -> None:
    first = provider.charge(request(), "idem_1")
    again = provider.charge(request(), "idem_1")
    other = provider.charge(request(), "idem_2")

    assert again == first
    assert other.charge_id != first.charge_id
    assert sandbox.ledger()["charges_by_order"] == {"ord_1001": 2}


@pytest.fixture(scope="module")
def locked_sandbox() -> Iterator[SandboxServer]:
    """Run a sandbox that wants API_KEY as a Bearer token."""
    with SandboxServer(api_key=API_KEY) as server:
        yield server


def test_the_api_key_is_sent_as_a_bearer_token(
    connect: Callable[..., HttpProvider], locked_sandbox: SandboxServer
) -> None:
    answer = connect(locked_sandbox.url, api_key=API_KEY).charge(request(), "idem_1")
    assert answer.status == "succeeded"


@pytest.mark.parametrize("api_key", ["", "sk_test_wrong"])
def test_without_the_right_api_key_the_provider_rejects_the_charge(
    connect: Callable[..., HttpProvider], locked_sandbox: SandboxServer, api_key: str
) -> None:
    with pytest.raises(ProviderRejection) as rejected:
        connect(locked_sandbox.url, api_key=api_key).charge(request(), "idem_1")
    assert rejected.value.status_code == 401


# What goes over the wire, seen by a plain HTTP server that records each request.


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class RecordingServer:
    """An HTTP server that records requests and answers each with `reply`."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    reply: tuple[int, bytes] = (200, b'{"id": "ch_recorded", "status": "succeeded"}')


@pytest.fixture
def recorder() -> Iterator[RecordingServer]:
    recording = RecordingServer()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"null")
            recording.requests.append(
                Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                         body)
            )
            status, data = recording.reply
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    recording.url = f"http://127.0.0.1:{server.server_port}"
    yield recording
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_charge_is_a_json_post_with_its_idempotency_key(
    connect: Callable[..., HttpProvider], recorder: RecordingServer
) -> None:
    connect(recorder.url + "/").charge(request(), "idem_abc")

    [sent] = recorder.requests
    assert (sent.method, sent.path) == ("POST", "/v1/charges")
    assert sent.headers["idempotency-key"] == "idem_abc"
    assert sent.headers["content-type"] == "application/json"
    assert sent.body == {
        "amount": 1999,
        "currency": "usd",
        "source": "tok_visa",
        "metadata": {"order_id": "ord_1001"},
    }


def test_the_authorization_header_is_sent_only_when_an_api_key_is_set(
    connect: Callable[..., HttpProvider], recorder: RecordingServer
) -> None:
    connect(recorder.url, api_key="").charge(request(), "idem_1")
    connect(recorder.url, api_key=API_KEY).charge(request(), "idem_1")

    without_key, with_key = recorder.requests
    assert "authorization" not in without_key.headers
    assert with_key.headers["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (201, b'{"id": "ch_201", "status": "succeeded"}', ProviderAnswer("succeeded", "ch_201")),
        (402, b"{}", ProviderAnswer("declined", decline_code="unknown")),
    ],
)
def test_other_answers_that_settle_a_charge(
    connect: Callable[..., HttpProvider],
    recorder: RecordingServer,
    status: int,
    body: bytes,
    expected: ProviderAnswer,
) -> None:
    recorder.reply = (status, body)
    assert connect(recorder.url).charge(request(), "idem_1") == expected


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b'{"status": "pending"}'),
        (200, b"not json"),
        (302, b"{}"),
    ],
)
def test_an_answer_without_a_settled_charge_is_a_failure_that_may_have_reached(
    connect: Callable[..., HttpProvider], recorder: RecordingServer, status: int, body: bytes
) -> None:
    recorder.reply = (status, body)
    with pytest.raises(ProviderFailure) as failed:
        connect(recorder.url).charge(request(), "idem_1")
    assert failed.value.may_have_reached is True


def test_a_client_error_without_a_json_body_is_still_a_rejection(
    connect: Callable[..., HttpProvider], recorder: RecordingServer
) -> None:
    recorder.reply = (404, b"<html>not found</html>")
    with pytest.raises(ProviderRejection) as rejected:
        connect(recorder.url).charge(request(), "idem_1")
    assert (rejected.value.status_code, rejected.value.code) == (404, "unknown")


def test_the_provider_class_comes_from_the_settings() -> None:
    provider = load_provider(Settings())
    try:
        assert isinstance(provider, HttpProvider)
    finally:
        provider.close()
    with pytest.raises(ValueError, match="payment_provider_class"):
        load_provider(Settings(payment_provider_class="workers.provider:NoSuchProvider"))


def test_an_answer_trickled_one_byte_at_a_time_ends_at_the_calls_total_deadline(
    connect: Callable[..., HttpProvider], sandbox_server: SandboxServer, sandbox: SandboxControl
) -> None:
    provider = connect(sandbox_server.url, timeout=0.5)
    # About 300 bytes at 50 ms each: 15 s for the whole answer, every read well in time.
    sandbox.set_faults("trickle", delay=0.05)
    began = time.monotonic()

    with pytest.raises(ProviderFailure) as failed:
        provider.charge(request(), "idem_trickle")

    took = time.monotonic() - began
    assert failed.value.may_have_reached
    assert "no answer in time" in failed.value.reason
    # Cut off at the deadline, not after the answer's 15 s (a bound of behaviour, not speed).
    assert took < 5
    assert sandbox.ledger()["charges_by_order"] == {"ord_1001": 1}


def test_a_connection_closed_without_an_answer_may_have_charged(
    provider: HttpProvider, sandbox: SandboxControl
) -> None:
    sandbox.set_faults("hang_up")

    with pytest.raises(ProviderFailure) as failed:
        provider.charge(request(), "idem_hang_up")

    assert failed.value.may_have_reached
    assert sandbox.ledger()["charges_by_order"] == {"ord_1001": 1}


@pytest.mark.parametrize(("status", "reached"), [(503, True), (429, False)])
def test_a_failure_carries_the_providers_retry_after(
    provider: HttpProvider, sandbox: SandboxControl, status: int, reached: bool
) -> None:
    sandbox.set_faults("down", status=status, retry_after=42)

    with pytest.raises(ProviderFailure) as failed:
        provider.charge(request(), "idem_later")

    assert failed.value.retry_after == 42.0
    assert failed.value.may_have_reached is reached


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("120", 120.0), ("Wed, 02 Dec 2026 10:00:30 GMT", 30.0),
     ("Wed, 02 Dec 2026 09:59:00 GMT", 0.0), ("soon", None), ("", None), (None, None),
     ("-5", None), ("Wed, 02 Dec 2026 10:00:30", None)],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(
    header: str | None, seconds: float | None
) -> None:
    now = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC).timestamp()

    assert retry_after(header, now=now) == seconds
