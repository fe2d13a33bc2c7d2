"""A log filter that keeps payment tokens, idempotency keys, card numbers and secrets out of logs.

Celery prints message bodies in some of its own lines (a refused or unregistered message),
so the filter sits on the handlers and rewrites every record that passes, whoever logged it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

MASK = "[redacted]"

# 13 to 19 digits standing alone: not the tail of a decimal like Celery's "succeeded in
# 0.0031s", nor digits glued to letters as in a task id or "ch_a24cb...". Only those that
# pass the Luhn check, as every card number does, are masked, so an order id such as
# "ord_20261129000001" stays readable nine times in ten.
_DIGIT_RUN = re.compile(r"(?<![A-Za-z0-9.])\d(?:[ -]?\d){12,18}(?![A-Za-z0-9.])")

# A secret field written as a Python repr, JSON, JSON inside a string, or a header.
_FIELD = re.compile(
    r"""(?<![A-Za-z_])(?P<name>payment_token|idempotency_key|source|api_key|payment_provider_api_key)"""
    r"""(?P<sep>\\*['"]?\s*[:=]\s*\\*['"]?)(?P<value>[^'"\\,}\s]+)""",
    re.IGNORECASE,
)
_HEADER = re.compile(
    r"(?<![A-Za-z_])(?P<name>Idempotency-Key|Authorization)(?P<sep>\\*['\"]?\s*[:=,]\s*\\*['\"]?)"
    r"(?P<value>(?:Bearer\s+)?[^'\"\\,}\s]+)",
    re.IGNORECASE,
)
# A bytes literal as repr() prints it, closed or cut short (Celery truncates long dumps).
_BYTES = re.compile(r"""\bb(?P<q>['"])(?P<body>(?:\\.|(?!(?P=q))[^\\\n])*)(?P=q)?""")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Return text with every secret field, card number and known secret masked."""
    text = _BYTES.sub(_mask_binary, text)
    text = _FIELD.sub(lambda m: f"{m['name']}{m['sep']}{MASK}", text)
    text = _HEADER.sub(lambda m: f"{m['name']}{m['sep']}{MASK}", text)
    text = _DIGIT_RUN.sub(_mask_card_number, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def _mask_card_number(match: re.Match[str]) -> str:
    return MASK if luhn_valid(re.sub(r"\D", "", match[0])) else match[0]


def luhn_valid(digits: str) -> bool:
    """Return True if the digits pass the Luhn checksum that card numbers carry."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _mask_binary(match: re.Match[str]) -> str:
    # Celery dumps a refused message's raw body. A JSON body's fields are masked one by one
    # below; any other (pickle, msgpack, ...) has no field syntax to find, so it goes whole.
    if match["body"].startswith(("[", "{")):
        return match[0]
    return f"b'{MASK}'"


class RedactingFilter(logging.Filter):
    """Rewrite each record's message and traceback with secrets masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        """Mask the record in place; never drop it."""
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must still be logged, and masked
            # Without its arguments: a value that fits no placeholder has no field name to
            # tell whether it is a secret.
            message = f"{record.msg!r} (arguments not shown: they do not fit the format)"
        clean = redact(message, self.secrets)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def install(logger: logging.Logger, secrets: Iterable[str] = ()) -> RedactingFilter:
    """Put one RedactingFilter on every handler of logger (again-safe)."""
    redactor = RedactingFilter(secrets)
    for handler in logger.handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(redactor)
    return redactor
