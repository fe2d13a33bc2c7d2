"""A charge's arguments are checked before anything else (CONTRACT.md section 3)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from tests.card_digits import card_digits
from tests.waiting import LogLines, wait_until
from workers.errors import InvalidCharge
from workers.runtime import forget, runtime
from workers.sandbox import SandboxControl
from workers.validation import derive_idempotency_key, parse_charge

VALID: dict[str, Any] = {
    "order_id": "ord_1001",
    "amount": 1999,
    "currency": "usd",
    "payment_token": "tok_visa",
}

CARD_NUMBERS = [
    "4242424242424242",
    "4242 4242 4242 4242",
    "4242-4242-4242-4242",
    "378282246310005",  # 15 digits
    "4222222222222",  # 13 digits
    "6011000990139424123",  # 19 digits
    "tok_4242424242424242",
    "4242424242424242_tok",
    "card:4000-0566-5566-5556",
]


def charge(**changes: Any) -> dict[str, Any]:
    """Return valid charge arguments with some fields changed."""
    return {**VALID, **changes}


def without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != name}


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        (without("order_id"), "order_id"),
        (charge(order_id=""), "order_id"),
        (charge(order_id="o" * 65), "order_id"),
        (charge(order_id="ord 1001"), "order_id"),
        (charge(order_id="ord/1001"), "order_id"),
        (charge(order_id="ördér"), "order_id"),
        (charge(order_id=1001), "order_id"),
        (without("amount"), "amount"),
        (charge(amount=0), "amount"),
        (charge(amount=-5), "amount"),
        (charge(amount=100_000_001), "amount"),
        (charge(amount=19.99), "amount"),
        (charge(amount="1999"), "amount"),
        (charge(amount=True), "amount"),
        (without("currency"), "currency"),
        (charge(currency="us"), "currency"),
        (charge(currency="usdd"), "currency"),
        (charge(currency="xyz"), "currency"),
        (charge(currency=840), "currency"),
        (without("payment_token"), "payment_token"),
        (charge(payment_token=""), "payment_token"),
        (charge(payment_token="tok visa"), "payment_token"),
        (charge(payment_token="t" * 256), "payment_token"),
        (charge(payment_token=4242), "payment_token"),
        (charge(payment_method=""), "payment_method"),
        (charge(payment_method="Card"), "payment_method"),
        (charge(payment_method="pay-pal"), "payment_method"),
        (charge(payment_method=None), "payment_method"),
        (charge(idempotency_key=""), "idempotency_key"),
        (charge(idempotency_key="two words"), "idempotency_key"),
        (charge(idempotency_key="k" * 256), "idempotency_key"),
        (charge(idempotency_key=42), "idempotency_key"),
    ],
)
def test_each_bad_field_is_refused_naming_the_field(arguments: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidCharge) as refused:
        parse_charge(arguments)
    assert str(refused.value).startswith(field)


def test_invalid_charge_is_a_value_error() -> None:
    assert issubclass(InvalidCharge, ValueError)


@pytest.mark.parametrize(
    "arguments",
    [
        charge(order_id="o" * 64),
        charge(order_id="A-z_0.9:x"),
        charge(amount=1),
        charge(amount=100_000_000),
        charge(payment_token="tok_123456789012"),  # 12 digits: no card number
        charge(payment_method="paypal"),
        charge(idempotency_key=None),
    ],
)
def test_values_at_the_edges_of_each_field_are_accepted(arguments: dict[str, Any]) -> None:
    request = parse_charge(arguments)
    assert request.order_id == arguments["order_id"]
    assert request.amount == arguments["amount"]


@pytest.mark.parametrize("token", CARD_NUMBERS)
def test_a_card_number_as_token_is_refused_without_echoing_it(token: str) -> None:
    with pytest.raises(InvalidCharge) as refused:
        parse_charge(charge(payment_token=token))
    message = str(refused.value)
    assert message.startswith("payment_token looks like a card number")
    assert token not in message
    assert not any(ch.isdigit() for ch in message)


@pytest.mark.parametrize("field", ["order_id", "currency", "payment_method"])
def test_a_card_number_in_another_field_is_never_echoed(field: str) -> None:
    with pytest.raises(InvalidCharge) as refused:
        parse_charge(charge(**{field: "4242 4242 4242 4242"}))
    assert "4242" not in str(refused.value)


def test_a_bad_token_is_never_echoed() -> None:
    with pytest.raises(InvalidCharge) as refused:
        parse_charge(charge(payment_token="tok secret value"))
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize("currency", ["usd", "USD", "Usd", "uSd"])
def test_currency_is_accepted_in_either_case_and_normalised_to_lower_case(currency: str) -> None:
    assert parse_charge(charge(currency=currency)).currency == "usd"


def test_payment_method_defaults_to_card_and_picks_the_breaker() -> None:
    assert parse_charge(VALID).payment_method == "card"
    assert parse_charge(VALID).breaker_name == "payments.card"
    assert parse_charge(charge(payment_method="paypal")).breaker_name == "payments.paypal"


def test_unknown_fields_are_refused_by_name() -> None:
    with pytest.raises(InvalidCharge, match=r"unknown field\(s\): customer_email"):
        parse_charge(charge(customer_email="a@example.com"))


def test_the_default_idempotency_key_is_stable_and_derived_from_the_charge() -> None:
    key = parse_charge(VALID).idempotency_key

    assert key == parse_charge(dict(VALID)).idempotency_key
    assert key == parse_charge(charge(idempotency_key=None)).idempotency_key
    assert key == derive_idempotency_key("ord_1001", 1999, "usd", "tok_visa")
    # Derived from the normalised charge: the currency's case makes no new charge.
    assert key == parse_charge(charge(currency="USD")).idempotency_key
    assert "tok_visa" not in key


@pytest.mark.parametrize(
    "change",
    [
        {"order_id": "ord_1002"},
        {"amount": 2000},
        {"currency": "eur"},
        {"payment_token": "tok_mastercard"},
    ],
)
def test_the_default_idempotency_key_changes_with_each_field_it_is_derived_from(
    change: dict[str, Any],
) -> None:
    assert parse_charge(charge(**change)).idempotency_key != parse_charge(VALID).idempotency_key


def test_a_given_idempotency_key_is_kept() -> None:
    assert parse_charge(charge(idempotency_key="idem_abc")).idempotency_key == "idem_abc"


# Through a worker: an invalid charge ends at once, touching neither provider nor breaker.


@pytest.fixture
def app(make_app: Callable[..., Celery]) -> Iterator[Celery]:
    """Return an app with an embedded worker running its tasks."""
    app = make_app(broker_transport_options={"polling_interval": 0.1})
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        yield app
        # pytest.raises leaves the test's AsyncResult in a cycle; collected after Redis has
        # stopped, it would try to unsubscribe 20 times, a second apart.
        gc.collect()
    forget(app)




@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        (charge(amount=0), "amount"),
        (charge(currency="xyz"), "currency"),
        (charge(payment_token="4242 4242 4242 4242"), "payment_token"),
        (charge(coupon="FREE"), "unknown field"),
    ],
)
def test_an_invalid_charge_fails_at_once_without_a_provider_call_or_a_breaker_record(
    app: Celery, sandbox: SandboxControl, arguments: dict[str, Any], field: str
) -> None:
    lines = LogLines()
    logging.getLogger().addHandler(lines)
    try:
        task = app.send_task("payments.charge", kwargs=arguments)
        with pytest.raises(InvalidCharge) as refused:
            task.get(timeout=20)
        # The worker logs the failure just after storing it.
        wait_until(lambda: any("InvalidCharge" in line for line in lines.lines), 20)
    finally:
        logging.getLogger().removeHandler(lines)

    assert str(refused.value).startswith(field)
    assert task.state == "FAILURE"  # not RETRY: no second try
    assert sandbox.ledger()["requests"]["total"] == 0
    snapshot = runtime(app).registry.get("payments.card").snapshot()
    assert (snapshot["calls"], snapshot["rejected"]) == (0, 0)
    assert card_digits(str(task.traceback)) == []
    assert not [line for line in lines.lines if card_digits(line)]
