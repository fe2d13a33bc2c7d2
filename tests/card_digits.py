"""Finding the test card's digits in logs and errors, apart from the random tokens around them."""

from __future__ import annotations

import re

# The test card's digits standing as a card number's groups ("4242 4242", "4242-4242",
# "4242424242424242", a lone "4242"), not inside a random token of a log line: a task id,
# a charge id, a port or a duration (task id "3e842426-..." once failed a test).
CARD_DIGITS = re.compile(r"(?<![\w.:-])4242(?:[ -]?4242)*(?!\w|\.\d)")


def card_digits(text: str) -> list[str]:
    """Return the test card's digit groups that text shows."""
    return CARD_DIGITS.findall(text)
