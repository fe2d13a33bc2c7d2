"""The order book's scripts against a real Redis: lock and fence, journal, outcomes, conflicts."""

from __future__ import annotations

import time

import pytest
import redis

from workers.orders import NotReplicated, OrderBook
from workers.validation import parse_charge

ORDER = "ord_book_1"
REQUEST = parse_charge(
    {"order_id": ORDER, "amount": 500, "currency": "eur", "payment_token": "tok_visa"}
)
KEY = REQUEST.idempotency_key


@pytest.fixture
def book(redis_client: redis.Redis) -> OrderBook:
    return OrderBook(redis_client, result_ttl=3600, lock_ttl=5)


def result(charge_id: str) -> dict[str, object]:
    return {"order_id": ORDER, "status": "succeeded", "charge_id": charge_id,
            "attempts": 1, "deferrals": 0}


def test_the_first_receipt_is_kept_whatever_comes_later(book: OrderBook) -> None:
    first = book.received(ORDER, "task-1", 1000.0)
    again = book.received(ORDER, "task-1", 2000.0)
    begun = book.begin(ORDER, "task-1:0", "task-1", KEY, 3000.0)

    assert first == again == begun.first_received == 1000.0
    assert book.received(ORDER, "task-2", 4000.0) == 4000.0


def test_one_message_holds_the_order_and_a_redelivery_takes_it_back_under_a_new_fence(
    book: OrderBook,
) -> None:
    mine = book.begin(ORDER, "task-1:0", "task-1", KEY, time.time())
    other = book.begin(ORDER, "task-2:0", "task-2", "other-key", time.time())
    back = book.begin(ORDER, "task-1:0", "task-1", KEY, time.time())

    assert mine.holds
    assert not other.holds
    assert 0 < other.busy_for <= 5
    assert back.fence > mine.fence
    # The first run of the message, fenced out, may not start an attempt any more.
    stale = book.attempt(ORDER, "task-1:0", mine.fence, KEY, REQUEST, "task-1", time.time())
    assert stale.kind == "stale"
    taken = book.attempt(ORDER, "task-1:0", back.fence, KEY, REQUEST, "task-1", time.time())
    assert taken.kind == "go"


def test_begin_journals_the_callers_attempt_as_attempt_would_unless_another_key_is_pending(
    book: OrderBook, redis_client: redis.Redis
) -> None:
    other = OrderBook(redis_client, result_ttl=3600, lock_ttl=5)
    separate = "ord_book_separate"
    request = parse_charge({**REQUEST.__dict__, "order_id": separate, "idempotency_key": KEY})
    # The same attempt journaled in two steps, on another order, to compare with.
    two_steps = other.begin(separate, "task-1:0", "task-1", KEY, 1000.0)
    other.attempt(separate, "task-1:0", two_steps.fence, KEY, request, "task-1", 1000.0)

    merged = book.begin(ORDER, "task-1:0", "task-1", KEY, 1000.0, attempt=REQUEST)
    journal, expected = book.journal(ORDER), other.journal(separate)

    assert merged.holds
    assert merged.journaled_calls == 1
    assert journal["pending"] == expected["pending"] == KEY
    assert journal["calls"] == expected["calls"] == {"task-1": 1}
    attempt, reference = journal["attempts"][KEY], expected["attempts"][KEY]
    assert {**attempt, "request": None} == {**reference, "request": None}
    assert attempt["request"] == {**reference["request"], "order_id": ORDER}
    # The same key again (a redelivery): journaled again, as its attempt may be replayed.
    again = book.begin(ORDER, "task-1:0", "task-1", KEY, 1001.0, attempt=REQUEST)
    assert again.journaled_calls == 2
    # Another message, another key: busy while task-1 holds the order; once it is free,
    # taken but not journaled, since the pending attempt must settle first.
    another = book.begin(ORDER, "task-2:0", "task-2", "key-2", 1002.0, attempt=REQUEST)
    assert not another.holds
    assert another.journaled_calls == 0
    book.release(ORDER, "task-1:0", again.fence)
    taken = book.begin(ORDER, "task-2:0", "task-2", "key-2", 1003.0, attempt=REQUEST)
    assert taken.holds
    assert taken.journaled_calls == 0
    assert taken.pending is not None
    assert taken.pending.key == KEY
    assert book.journal(ORDER)["pending"] == KEY


def test_a_lock_that_ran_out_with_nobody_taking_it_may_be_taken_back(
    book: OrderBook, redis_client: redis.Redis
) -> None:
    begun = book.begin(ORDER, "task-1:0", "task-1", KEY, time.time())
    redis_client.delete(OrderBook.keys(ORDER)[1])  # as if the lock's TTL ran out

    journaled = book.attempt(ORDER, "task-1:0", begun.fence, KEY, REQUEST, "task-1", time.time())

    assert (journaled.kind, journaled.calls) == ("go", 1)
    assert redis_client.get(OrderBook.keys(ORDER)[1]) == f"task-1:0 {begun.fence}".encode()


def test_an_unknown_attempt_is_pending_for_every_task_until_an_answer_settles_it(
    book: OrderBook,
) -> None:
    begun = book.begin(ORDER, "task-1:0", "task-1", KEY, time.time())
    book.attempt(ORDER, "task-1:0", begun.fence, KEY, REQUEST, "task-1", time.time())
    book.settle(ORDER, "task-1:0", begun.fence, KEY, "unknown", time.time())
    # A later call with the same key that was refused (429) says nothing of the first one.
    again = book.begin(ORDER, "task-1:1", "task-1", KEY, time.time())
    book.attempt(ORDER, "task-1:1", again.fence, KEY, REQUEST, "task-1", time.time())
    still = book.settle(ORDER, "task-1:1", again.fence, KEY, "not_reached", time.time())

    other = book.begin(ORDER, "task-2:0", "task-2", "another-key", time.time())

    assert still.status == "unknown"
    assert other.pending is not None
    assert (other.pending.key, other.pending.task) == (KEY, "task-1")
    assert other.pending.request == REQUEST
    # Its own key is refused while the first is pending.
    refused = book.attempt(ORDER, "task-2:0", other.fence, "another-key", REQUEST, "task-2",
                           time.time())
    assert refused.kind == "pending"
    book.settle(ORDER, "task-2:0", other.fence, KEY, "declined", time.time(), release=False)
    assert book.attempt(ORDER, "task-2:0", other.fence, "another-key", REQUEST, "task-2",
                        time.time()).kind == "go"


def test_the_first_success_is_kept_and_a_second_charge_is_a_conflict_counted_once(
    book: OrderBook,
) -> None:
    first = book.settle(ORDER, "a:0", 1, "key-a", "succeeded", time.time(),
                        charge_id="ch_1", result=result("ch_1"))
    second = book.settle(ORDER, "b:0", 2, "key-b", "succeeded", time.time(),
                         charge_id="ch_2", result=result("ch_2"))
    replayed = book.settle(ORDER, "b:1", 3, "key-b", "succeeded", time.time(),
                           charge_id="ch_2", result=result("ch_2"))

    assert first.result == second.result == replayed.result == result("ch_1")
    assert (first.new_conflict, second.new_conflict, replayed.new_conflict) == (
        False, True, False
    )
    [conflict] = replayed.conflicts
    assert (conflict["charge_id"], conflict["first_charge_id"]) == ("ch_2", "ch_1")
    done = book.begin(ORDER, "c:0", "c", "key-a", time.time())
    assert done.result == result("ch_1")
    assert done.conflicts == [conflict]
    assert done.own_status == "succeeded"


def test_an_outcome_is_recorded_even_when_the_redis_is_at_maxmemory(
    book: OrderBook, redis_client: redis.Redis
) -> None:
    begun = book.begin(ORDER, "task-1:0", "task-1", KEY, time.time())
    book.attempt(ORDER, "task-1:0", begun.fence, KEY, REQUEST, "task-1", time.time())
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", 1)
    try:
        # Before a call the journal refuses (the charge defers); after one, money moved.
        with pytest.raises(redis.RedisError, match="maxmemory"):
            book.begin("ord_other", "task-9:0", "task-9", "k9", time.time())
        settled = book.settle(ORDER, "task-1:0", begun.fence, KEY, "succeeded", time.time(),
                              charge_id="ch_9", result=result("ch_9"))
    finally:
        redis_client.config_set("maxmemory", 0)

    assert settled.result == result("ch_9")
    assert book.result(ORDER) == result("ch_9")
    assert redis_client.exists(OrderBook.keys(ORDER)[1]) == 0  # lock freed


def test_a_journal_write_no_replica_acknowledges_is_an_error(redis_client: redis.Redis) -> None:
    book = OrderBook(redis_client, result_ttl=3600, lock_ttl=5, replicas=1, replica_timeout=0.1)
    begun = book.begin(ORDER, "task-1:0", "task-1", KEY, time.time())

    with pytest.raises(NotReplicated, match="0 of 1 replica"):
        book.attempt(ORDER, "task-1:0", begun.fence, KEY, REQUEST, "task-1", time.time())
