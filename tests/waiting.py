"""Waiting on conditions with deadlines, and the log lines to wait on; never a bare sleep."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], within: float, what: str = "a condition", interval: float = 0.01
) -> T:
    """Return condition()'s first truthy value, polling; fail the test after within seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"still waiting, after {within}s, for {what}"
        time.sleep(interval)


class LogLines(logging.Handler):
    """Every line logged to the logger it is added to, formatted as a worker prints it."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._lines: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self._lines.append(self.format(record))

    @property
    def lines(self) -> list[str]:
        """Return the lines logged so far, oldest first."""
        with self._guard:
            return list(self._lines)

    @property
    def text(self) -> str:
        """Return the lines logged so far as one text."""
        return "\n".join(self.lines)

    def matches(self, pattern: re.Pattern[str]) -> list[re.Match[str]]:
        """Return the matches of pattern in the lines logged so far, oldest first."""
        return [m for line in self.lines if (m := pattern.search(line))]

    def wait_for(
        self, pattern: re.Pattern[str], count: int = 1, within: float = 20.0
    ) -> list[re.Match[str]]:
        """Return the first count matches of pattern, waiting for them to be logged."""
        wait_until(
            lambda: len(self.matches(pattern)) >= count, within,
            f"{count} log line(s) like {pattern.pattern!r}",
        )
        return self.matches(pattern)[:count]
