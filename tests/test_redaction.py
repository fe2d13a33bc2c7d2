"""No payment token, idempotency key, card number or API key reaches a log line."""

from __future__ import annotations

import gc
import io
import json
import logging
import pickle
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker

from tests.card_digits import card_digits
from tests.redis_server import RedisServer
from tests.waiting import LogLines, wait_until
from workers import redaction
from workers.celery import create_app
from workers.redaction import MASK, RedactingFilter, redact
from workers.runtime import forget
from workers.sandbox import SandboxControl, SandboxServer

TOKEN = "tok_live_s3cr3tvalue"
KEY = "idem_s3cr3tkey"
API_KEY = "sk_live_apikey9000"
CARD = "4242 4242 4242 4242"
SECRETS = (TOKEN, KEY, API_KEY, "s3cr3t")
CHARGE_FIELDS: dict[str, Any] = {
    "order_id": "ord_1001",
    "amount": 1999,
    "currency": "usd",
    "payment_token": TOKEN,
    "idempotency_key": KEY,
}


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """Return a logger whose handler carries the redacting filter, and what it wrote."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"test.redaction.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    redaction.install(logger, secrets=[API_KEY])
    yield logger, out
    logger.removeHandler(handler)


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text] + card_digits(text)


@pytest.mark.parametrize(
    ("message", "args"),
    [
        ("charging %r", ({"order_id": "ord_1", "payment_token": TOKEN},)),
        ("charging %r", ({"idempotency_key": KEY},)),
        ("body %s", ('{"payment_token": "' + TOKEN + '", "idempotency_key": "' + KEY + '"}',)),
        ("kwargsrepr %r", ('{"payment_token": "' + TOKEN + '"}',)),
        ("payment_token=%s idempotency_key=%s", (TOKEN, KEY)),
        ("provider body %s", ('{"source": "' + TOKEN + '"}',)),
        ("headers %r", ({"Authorization": f"Bearer {API_KEY}", "Idempotency-Key": KEY},)),
        ("Authorization: Bearer %s", (API_KEY,)),
        ("Idempotency-Key: %s", (KEY,)),
        ("card %s", (CARD,)),
        ("card %s exp 12 34, cvv 123", (CARD,)),
        ("card %s 12/34", ("4242-4242-4242-4242",)),
        ("charging %r", ({"payment_token": CARD},)),
        ("charging %s", ('{"payment_token": "' + CARD + '"}',)),
        ("args %s", ("('ord_1', 1999, 'usd', '" + CARD + "')",)),
        ("headers %r", ({"argsrepr": f"('ord_1', 1999, 'usd', '{TOKEN}')"},)),
        ("body was:\n%s (77b)", ("b'[[\"ord_1\", 1999, \"usd\", \"" + TOKEN + "\"], {}, {}]'",)),
        ("card %s", ("4242-4242-4242-4242",)),
        ("card %s", ("4242424242424242",)),
        ("token %s", ("tok_4242424242424242",)),
        ("configured with %s", (API_KEY,)),
        ("body was:\n%s (183b)", (repr(pickle.dumps(CHARGE_FIELDS)),)),
        ("body was:\n%s (183b)", (repr(pickle.dumps(CHARGE_FIELDS, protocol=0)),)),
        ("body was:\n%s... (4096b)", (repr(pickle.dumps(CHARGE_FIELDS))[:-1],)),  # cut short
    ],
)
def test_secrets_in_a_message_are_masked(
    log: tuple[logging.Logger, io.StringIO], message: str, args: tuple[Any, ...]
) -> None:
    logger, out = log
    logger.info(message, *args)
    written = out.getvalue()
    assert leaks(written) == []
    assert MASK in written


def test_secrets_in_a_traceback_are_masked(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = log
    try:
        raise RuntimeError(f"charge failed for payment_token={TOKEN} card {CARD} key {API_KEY}")
    except RuntimeError:
        logger.exception("charge %s failed", "ord_1")

    written = out.getvalue()
    assert "Traceback (most recent call last)" in written
    assert "RuntimeError" in written
    assert leaks(written) == []


def test_secrets_in_stack_info_are_masked(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = log
    payment_token = TOKEN  # noqa: F841  (a local in the frame: not shown by stack_info)
    logger.info("payment_token=%s", TOKEN, stack_info=True)
    written = out.getvalue()
    assert "Stack (most recent call last)" in written
    assert leaks(written) == []


def test_what_is_not_secret_is_kept(log: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = log
    line = (
        "Task payments.charge[abc] succeeded in 0.0031234567890123s: "
        "{'order_id': 'ord_1001', 'amount': 1999, 'charge_id': 'ch_42'}"
    )
    logger.info(line)
    assert out.getvalue().strip() == f"INFO {line}"


def test_a_broken_format_string_is_still_logged_and_masked(
    log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = log
    logger.info("payment_token=%s idempotency_key=%s", TOKEN)  # one argument short
    written = out.getvalue()
    assert "payment_token" in written
    assert leaks(written) == []


def test_installing_twice_leaves_one_filter_per_handler() -> None:
    logger = logging.getLogger(f"test.redaction.{uuid.uuid4().hex}")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    redaction.install(logger)
    redaction.install(logger, secrets=[API_KEY])
    filters = [f for f in handler.filters if isinstance(f, RedactingFilter)]
    assert len(filters) == 1
    assert filters[0].secrets == (API_KEY,)


def test_the_worker_log_setup_installs_the_filter_with_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAYMENT_PROVIDER_API_KEY", API_KEY)
    logger = logging.getLogger(f"test.redaction.{uuid.uuid4().hex}")
    out = io.StringIO()
    logger.addHandler(logging.StreamHandler(out))
    logger.propagate = False

    # What Celery sends once it has set up the worker's logging.
    signals.after_setup_logger.send(sender=None, logger=logger, loglevel=logging.INFO,
                                    logfile=None, format="", colorize=False)
    logger.warning("key %s, payment_token=%s", API_KEY, TOKEN)

    assert leaks(out.getvalue()) == []


# Through a worker: Celery's own lines, its dumps of refused messages included.



@pytest.fixture
def worker_log(make_app: Callable[..., Celery]) -> Iterator[tuple[Celery, LogLines]]:
    """Start a worker and return its app and the lines logged while it runs."""
    app = make_app(broker_transport_options={"polling_interval": 0.1})
    with start_worker(
        app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="INFO"
    ):
        root = logging.getLogger()
        captured = LogLines()
        root.addHandler(captured)
        # The worker installs the filter from Celery's after_setup_logger signal, which an
        # embedded worker may not send: install it as the worker would, on every root handler.
        redaction.install(root, secrets=[API_KEY])
        try:
            yield app, captured
        finally:
            root.removeHandler(captured)
            # Result objects left in cycles unsubscribe when collected: do it while Redis
            # is up, not after the session's redis-server has stopped (20 retries at exit).
            gc.collect()
    forget(app)



def publish_raw(app: Celery, body: bytes, content_type: str) -> None:
    """Publish a payments.charge message with a body the worker must refuse."""
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "payments.charge", "id": task_id, "root_id": task_id}
    with app.connection_for_write() as connection:
        connection.Producer().publish(
            body, routing_key="celery", content_type=content_type,
            content_encoding="binary", headers=headers,
        )


def test_a_refused_pickle_message_leaves_no_token_in_the_worker_log(
    worker_log: tuple[Celery, LogLines],
) -> None:
    app, captured = worker_log

    app.send_task("payments.charge", kwargs=CHARGE_FIELDS, serializer="pickle")
    body = ((), CHARGE_FIELDS, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    publish_raw(app, pickle.dumps(body, protocol=0), "application/x-python-serialize")

    wait_until(
        lambda: captured.text.count("Received invalid task message") == 2, 20,
        "the worker to refuse both messages",
    )
    assert "untrusted content of type pickle" in captured.text
    assert leaks(captured.text) == []


def test_an_unregistered_task_dump_leaves_no_token_in_the_worker_log(
    worker_log: tuple[Celery, LogLines],
) -> None:
    app, captured = worker_log

    app.send_task("payments.refund", kwargs=CHARGE_FIELDS)

    wait_until(
        lambda: "The full contents of the message headers" in captured.text, 20,
        "the worker to refuse the message",
    )
    assert "ord_1001" in captured.text  # the dump is there, only its secrets are masked
    assert leaks(captured.text) == []


def test_a_charge_leaves_no_token_in_the_worker_log(
    worker_log: tuple[Celery, LogLines], sandbox: SandboxControl
) -> None:
    app, captured = worker_log

    result = app.send_task("payments.charge", kwargs=CHARGE_FIELDS).get(timeout=20)

    assert result["status"] == "succeeded"
    wait_until(lambda: "succeeded in" in captured.text, 20, "the worker's success line")
    assert "Charge ord_1001 succeeded" in captured.text
    assert leaks(captured.text) == []


def test_an_unregistered_task_with_positional_arguments_leaves_no_token_in_the_worker_log(
    worker_log: tuple[Celery, LogLines],
) -> None:
    app, captured = worker_log

    app.send_task("payments.refund", args=["ord_1001", 1999, "usd", TOKEN, "card", KEY])

    wait_until(
        lambda: "The full contents of the message headers" in captured.text, 20,
        "the worker to refuse the message",
    )
    assert "payments.refund" in captured.text
    assert leaks(captured.text) == []


def test_no_token_in_what_the_worker_reports_of_a_charge_waiting_to_run_again(
    make_app: Callable[..., Celery], sandbox: SandboxControl
) -> None:
    # A provider failure: the charge is rescheduled with a backoff countdown, its next
    # message sent by the worker and held by it until due.
    app = make_app(
        breaker_failure_threshold=10, payment_retry_backoff=6.0, payment_retry_backoff_max=6.0,
        broker_transport_options={"polling_interval": 0.1},
    )
    sandbox.set_faults("down", status=503)
    events: list[dict[str, Any]] = []
    with start_worker(
        app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="INFO"
    ), app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": events.append})
        listening = threading.Thread(
            target=receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True
        )
        listening.start()
        # The web tier sends the charge with its own redacted repr, as the README shows.
        app.send_task(
            "payments.charge", args=["ord_1001", 1999, "usd", TOKEN],
            kwargs={"idempotency_key": KEY}, argsrepr="('ord_1001', 1999, 'usd', '[redacted]')",
            kwargsrepr="{'idempotency_key': '[redacted]'}",
        )
        wait_until(
            lambda: any(e["type"] == "task-retried" for e in events)
            and any(e["type"] == "task-received" and e.get("retries") for e in events),
            20, "the retry's events",
        )
        # The next message waits in the worker on its countdown: what `inspect scheduled` shows,
        # and what the broker holds for it (unacked, with the reprs the worker gave it).
        scheduled = app.control.inspect(timeout=2).scheduled() or {}
        broker = redis.Redis.from_url(app.conf.broker_url)
        held_messages = [json.loads(raw)[0] for raw in broker.hvals("unacked")]
        broker.close()
        receiver.should_stop = True
        listening.join(timeout=5)
        gc.collect()
    forget(app)

    kinds = {e["type"] for e in events}
    assert {"task-received", "task-retried"} <= kinds
    [sent_by_worker] = [m for m in held_messages if m["headers"].get("retries")]
    assert "[redacted]" in sent_by_worker["headers"]["argsrepr"]
    reprs = sent_by_worker["headers"]["argsrepr"] + sent_by_worker["headers"]["kwargsrepr"]
    assert leaks(reprs) == []
    received = [e for e in events if e["type"] == "task-received"]
    assert all("[redacted]" in e["args"] for e in received)
    assert [r for held in scheduled.values() for r in held], "no deferred charge was held"
    assert [e for e in events if leaks(json.dumps(e))] == []
    assert leaks(json.dumps(scheduled)) == [], scheduled


def test_no_url_password_in_the_config_flower_shows(
    spare_redis_server: RedisServer, sandbox_server: SandboxServer
) -> None:
    password = "s3cr3t-redis-password"
    admin = redis.Redis.from_url(spare_redis_server.url)
    admin.config_set("requirepass", password)
    url = f"redis://:{password}@127.0.0.1:{spare_redis_server.port}/0"
    app = create_app(
        "redaction-conf", broker_url=url, result_backend=url, breaker_redis_url=url,
        payment_provider_url=sandbox_server.url,
        broker_transport_options={"polling_interval": 0.1},
    )
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False):
            replies = app.control.inspect(timeout=2).conf(with_defaults=False) or {}
    finally:
        forget(app)
        app.close()
        admin.close()

    [conf] = replies.values()
    assert conf["breaker_redis_url"] == f"redis://:********@127.0.0.1:{spare_redis_server.port}/0"
    assert password not in json.dumps(replies)


def test_task_ids_are_never_taken_for_card_numbers() -> None:
    # uuid4's all-digit groups once made a Luhn-valid 8-4-4 about once in 8,000 ids.
    rng = random.Random(7)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(100_000)]
    ids.append("12345678-1234-5678-9012-123456789012")

    assert [i for i in ids if redact(f"Task payments.charge[{i}] received") != (
        f"Task payments.charge[{i}] received")] == []
    assert redact("card 4242-4242-4242-4242") == f"card {MASK}"


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("card 4242 4242 4242 4242", ["4242 4242 4242 4242"]),
        ("card 4242-4242-4242-4242.", ["4242-4242-4242-4242"]),
        ("card=4242424242424242", ["4242424242424242"]),
        ("last four 4242", ["4242"]),
        ("Task payments.charge[3e842426-47e4-4242-b911-fd388058e5ba] received", []),
        ("Connected to redis://127.0.0.1:42425/0; took 0.0042421s; ch_ab4242cd", []),
    ],
)
def test_the_card_check_tells_a_card_from_a_random_token(text: str, found: list[str]) -> None:
    assert card_digits(text) == found


@pytest.mark.parametrize(
    "text",
    ["\u017fource=tok_live_x1", "IDEMPOTENCY_\u212aEY: idem_x1", "Authorization: Bearer sk_x1"],
)
def test_a_field_name_spelled_with_unicode_case_folds_is_still_masked(text: str) -> None:
    # The words that let a line skip a pattern are compared case-folded, as the patterns
    # match them (re.IGNORECASE): a long s or a Kelvin sign does not hide a field.
    assert "x1" not in redact(text)
