"""Check a charge's arguments at the task boundary, before anything else happens."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from workers.errors import InvalidCharge

MAX_AMOUNT = 100_000_000
ORDER_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
PAYMENT_METHOD = re.compile(r"[a-z0-9_]{1,32}")
OPAQUE = re.compile(r"[\x21-\x7e]{1,255}")
# 13 to 19 digits, single spaces or dashes between them: what a card number looks like.
CARD_NUMBER = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")

# ISO 4217 codes of currencies in circulation, lower case.
CURRENCIES = frozenset({
    "aed", "afn", "all", "amd", "ang", "aoa", "ars", "aud", "awg", "azn", "bam", "bbd", "bdt",
    "bgn", "bhd", "bif", "bmd", "bnd", "bob", "bov", "brl", "bsd", "btn", "bwp", "byn", "bzd",
    "cad", "cdf", "che", "chf", "chw", "clf", "clp", "cny", "cop", "cou", "crc", "cuc", "cup",
    "cve", "czk", "djf", "dkk", "dop", "dzd", "egp", "ern", "etb", "eur", "fjd", "fkp", "gbp",
    "gel", "ghs", "gip", "gmd", "gnf", "gtq", "gyd", "hkd", "hnl", "htg", "huf", "idr", "ils",
    "inr", "iqd", "irr", "isk", "jmd", "jod", "jpy", "kes", "kgs", "khr", "kmf", "kpw", "krw",
    "kwd", "kyd", "kzt", "lak", "lbp", "lkr", "lrd", "lsl", "lyd", "mad", "mdl", "mga", "mkd",
    "mmk", "mnt", "mop", "mru", "mur", "mvr", "mwk", "mxn", "mxv", "myr", "mzn", "nad", "ngn",
    "nio", "nok", "npr", "nzd", "omr", "pab", "pen", "pgk", "php", "pkr", "pln", "pyg", "qar",
    "ron", "rsd", "rub", "rwf", "sar", "sbd", "scr", "sdg", "sek", "sgd", "shp", "sle", "sll",
    "sos", "srd", "ssp", "stn", "svc", "syp", "szl", "thb", "tjs", "tmt", "tnd", "top", "try",
    "ttd", "twd", "tzs", "uah", "ugx", "usd", "usn", "uyi", "uyu", "uyw", "uzs", "ved", "ves",
    "vnd", "vuv", "wst", "xaf", "xcd", "xcg", "xof", "xpf", "yer", "zar", "zmw", "zwg", "zwl",
})

FIELDS = ("order_id", "amount", "currency", "payment_token", "payment_method", "idempotency_key")


@dataclass(frozen=True)
class ChargeRequest:
    """A charge whose every field has been checked."""

    order_id: str
    amount: int
    currency: str
    payment_token: str = field(repr=False)
    payment_method: str = "card"
    idempotency_key: str = field(default="", repr=False)

    @property
    def breaker_name(self) -> str:
        """Return the breaker that guards this payment method."""
        return f"payments.{self.payment_method}"


def derive_idempotency_key(order_id: str, amount: int, currency: str, token: str) -> str:
    """Return the key every attempt of one charge carries when the caller gave none."""
    digest = hashlib.sha256(f"{order_id}\x1f{amount}\x1f{currency}\x1f{token}".encode())
    return f"pb_{digest.hexdigest()[:40]}"


def parse_charge(arguments: dict[str, Any]) -> ChargeRequest:
    """Return the checked charge, or raise InvalidCharge naming the first bad field."""
    unknown = sorted(set(arguments) - set(FIELDS))
    if unknown:
        raise InvalidCharge(f"unknown field(s): {', '.join(unknown)}; expected {', '.join(FIELDS)}")

    order_id = arguments.get("order_id")
    if not isinstance(order_id, str) or not ORDER_ID.fullmatch(order_id):
        raise InvalidCharge(
            "order_id must be 1 to 64 characters of A-Z a-z 0-9 _ . : -, got "
            f"{_describe(order_id)}"
        )

    amount = arguments.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise InvalidCharge(f"amount must be an integer of minor units, got {_describe(amount)}")
    if not 1 <= amount <= MAX_AMOUNT:
        raise InvalidCharge(f"amount must be between 1 and {MAX_AMOUNT:,}, got {amount}")

    currency = arguments.get("currency")
    if not isinstance(currency, str) or currency.lower() not in CURRENCIES:
        raise InvalidCharge(
            f"currency must be an ISO 4217 three-letter code, got {_describe(currency)}"
        )

    token = arguments.get("payment_token")
    # Never echo a token: it may be a card number or a secret.
    if isinstance(token, str) and CARD_NUMBER.search(token):
        raise InvalidCharge(
            "payment_token looks like a card number; send the provider's opaque token, "
            "never card data"
        )
    if not isinstance(token, str) or not OPAQUE.fullmatch(token):
        raise InvalidCharge(
            "payment_token must be the provider's opaque token: 1 to 255 printable characters "
            "without spaces" + ("" if isinstance(token, str) else f", got a {type(token).__name__}")
        )

    method = arguments.get("payment_method", "card")
    if not isinstance(method, str) or not PAYMENT_METHOD.fullmatch(method):
        raise InvalidCharge(
            f"payment_method must be 1 to 32 characters of a-z 0-9 _, got {_describe(method)}"
        )

    key = arguments.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not OPAQUE.fullmatch(key)):
        raise InvalidCharge(
            "idempotency_key must be 1 to 255 printable characters without spaces, or null"
        )
    currency = currency.lower()
    return ChargeRequest(
        order_id=order_id,
        amount=amount,
        currency=currency,
        payment_token=token,
        payment_method=method,
        idempotency_key=key or derive_idempotency_key(order_id, amount, currency, token),
    )


def _describe(value: object) -> str:
    if isinstance(value, str):
        shown = CARD_NUMBER.sub("[card number]", value)
        return repr(shown if len(shown) <= 40 else shown[:40] + "...")
    if value is None:
        return "nothing"
    if isinstance(value, int | float):
        return repr(value)
    return f"a {type(value).__name__}"
