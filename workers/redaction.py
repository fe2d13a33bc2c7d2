"""A log filter that keeps payment tokens, idempotency keys, card numbers and secrets out of logs.

Celery prints message bodies in some of its own lines (a refused or unregistered message),
so the filter sits on the handlers and rewrites every record that passes, whoever logged it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MASK = "[redacted]"

# The charge's fields that are secret, and where they stand when sent positionally
# (workers.validation.FIELDS: order_id, amount, currency, payment_token, payment_method,
# idempotency_key).
SECRET_FIELDS = frozenset({"payment_token", "idempotency_key"})
SECRET_POSITIONS = (False, False, False, True, False, True)

# Digits in groups separated by single spaces or dashes, standing alone: not the tail of a
# decimal like Celery's "succeeded in 0.0031s", nor digits glued to letters as in a task id
# or "ch_a24cb...", nor a part of a token joined by dashes (a task id: uuid4's all-digit
# groups make a Luhn-valid 8-4-4 about once in 8,000 ids). A card number is 13 to 19 of
# them passing the Luhn check, written whole
# or in groups, possibly followed by more groups (an expiry, a CVV): every run of whole
# groups is tried. Luhn keeps most other numbers readable (an order id such as
# "ord_20261129000001" nine times in ten).
_DIGIT_RUN = re.compile(r"(?<![A-Za-z0-9.-])\d+(?:[ -]\d+)*(?![A-Za-z0-9.]|-[A-Za-z0-9])")
_GROUP = re.compile(r"\d+")

# A secret field written as a Python repr, JSON, JSON inside a string, or a header; a quoted
# value is masked up to its closing quote, spaces and all.
_FIELD = re.compile(
    r"""(?<![A-Za-z_])(?P<name>payment_token|idempotency_key|source|api_key|payment_provider_api_key)"""
    r"""(?P<sep>\\*['"]?\s*[:=]\s*)"""
    r"""(?:(?P<q>\\*['"])(?P<quoted>.*?)(?P=q)|(?P<value>[^'"\\,}\s]+))""",
    re.IGNORECASE,
)
_HEADER = re.compile(
    r"(?<![A-Za-z_])(?P<name>Idempotency-Key|Authorization)(?P<sep>\\*['\"]?\s*[:=,]\s*\\*['\"]?)"
    r"(?P<value>(?:Bearer\s+)?[^'\"\\,}\s]+)",
    re.IGNORECASE,
)
# The repr of a message's positional arguments, as Celery's dumps of message headers show
# it: no field names to tell the token from the rest, so it goes whole.
_ARGSREPR = re.compile(
    r"""(?P<name>(?<![A-Za-z_])['"]?argsrepr['"]?\s*[:=]\s*)(?P<q>['"])(?:\\.|(?!(?P=q)).)*(?:(?P=q)|$)"""
)
# A bytes literal as repr() prints it, closed or cut short (Celery truncates long dumps).
_BYTES = re.compile(r"""\bb(?P<q>['"])(?P<body>(?:\\.|(?!(?P=q))[^\\\n])*)(?P=q)?""")


# What each pattern cannot match without: a line holding none of a pattern's words skips it
# (most lines hold none), for a substring test instead of a regular expression's scan.
_FIELD_WORDS = ("payment_token", "idempotency_key", "source", "api_key")
_HEADER_WORDS = ("idempotency-key", "authorization")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Return text with every secret field, card number and known secret masked."""
    if "b'" in text or 'b"' in text:
        text = _BYTES.sub(_mask_binary, text)
    if "argsrepr" in text:
        text = _ARGSREPR.sub(lambda m: f"{m['name']}'{MASK}'", text)
    lower = text.casefold()  # as re.IGNORECASE folds: a long s (U+017F) is an s
    if any(word in lower for word in _FIELD_WORDS):
        text = _FIELD.sub(_mask_field, text)
    if any(word in lower for word in _HEADER_WORDS):
        text = _HEADER.sub(lambda m: f"{m['name']}{m['sep']}{MASK}", text)
    text = _DIGIT_RUN.sub(_mask_card_numbers, text)
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def _mask_field(match: re.Match[str]) -> str:
    if match["q"] is not None:
        return f"{match['name']}{match['sep']}{match['q']}{MASK}{match['q']}"
    return f"{match['name']}{match['sep']}{MASK}"


_UUID = re.compile(r"\d{8}-\d{4}-\d{4}-\d{4}-\d{12}")


def _mask_card_numbers(match: re.Match[str]) -> str:
    run = match[0]
    if _UUID.fullmatch(run):
        return run
    groups = [(g.start(), g.end()) for g in _GROUP.finditer(run)]
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(groups):
        found = _card_at(run, groups, i)
        if found is None:
            i += 1
            continue
        spans.append((groups[i][0], groups[found][1]))
        i = found + 1
    for start, end in reversed(spans):
        run = run[:start] + MASK + run[end:]
    return run


def _card_at(run: str, groups: list[tuple[int, int]], first: int) -> int | None:
    """Return the last group of a card number starting at group first, longest first."""
    digits = ""
    candidates: list[int] = []
    for last in range(first, len(groups)):
        start, end = groups[last]
        digits += run[start:end]
        if len(digits) > 19:
            break
        if len(digits) >= 13 and luhn_valid(digits):
            candidates.append(last)
    return candidates[-1] if candidates else None


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
    # Celery dumps a refused message's raw body. A JSON body's named fields are masked one by
    # one below, and its positional arguments (the first array) go whole: they carry no
    # names. Any other body (pickle, msgpack, ...) has no syntax to find, so it goes whole.
    body = match["body"]
    if body.startswith("[["):
        end = _closing_bracket(body, 1)
        rest = body[end:] if end is not None else ""
        inner = body[2 : end - 1] if end is not None else body[2:]
        masked = "[]" if not inner.strip() else f'["{MASK}"]'
        return f"b{match['q']}[{masked}{rest}{match['q'] if end is not None else ''}"
    if body.startswith("{"):
        return match[0]
    return f"b'{MASK}'"


def _closing_bracket(text: str, start: int) -> int | None:
    """Return the index after the bracket closing the one at text[start], quotes respected."""
    depth, quoted, escaped = 0, False, False
    for i in range(start, len(text)):
        char = text[i]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif not quoted and char == "[":
            depth += 1
        elif not quoted and char == "]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def charge_reprs(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[str, str]:
    """Return argsrepr and kwargsrepr of a charge's arguments with its token and key masked."""
    shown_args = [
        MASK if i < len(SECRET_POSITIONS) and SECRET_POSITIONS[i] else value
        for i, value in enumerate(args)
    ]
    shown_kwargs = {
        name: MASK if name in SECRET_FIELDS else value for name, value in kwargs.items()
    }
    return redact(_short_repr(tuple(shown_args))), redact(_short_repr(shown_kwargs))


def _short_repr(value: object, limit: int = 1024) -> str:
    # Celery cuts argsrepr and kwargsrepr at 1024 characters too.
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
