"""The live view of the sale: redrawn in place on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import TextIO

from workers.demo.watch import Tally

PLAIN_LINE_SECONDS = 1.0
COLORS = {"closed": "32", "open": "31", "half_open": "33"}  # green, red, yellow
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class Status:
    """Everything the view shows at one moment of the sale."""

    elapsed: float
    phase: str
    phase_note: str
    tally: Tally
    breaker_state: str | None = None
    retry_after: float = 0.0
    breaker_rejected: int = 0
    provider_calls: int = 0
    provider_by_status: dict[str, int] = field(default_factory=dict)
    outage_calls: int = 0


class LiveView:
    """Show the sale's status as it changes."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.color = self.live and "NO_COLOR" not in os.environ
        encoding = (getattr(self.stream, "encoding", None) or "").lower()
        self.bar_chars = ("█", "░") if encoding.startswith("utf") else ("#", "-")
        self._drawn = 0
        self._last_plain = float("-inf")
        self._last_phase = ""
        self._last_line = ""

    def say(self, text: str) -> None:
        """Print a line above the live block."""
        self._erase()
        print(text, file=self.stream, flush=True)

    def update(self, status: Status) -> None:
        """Redraw the block on a terminal; else print a line each second or on a new phase."""
        if self.live:
            self._erase()
            lines = self._block(status)
            # Hidden cursor while redrawing: no flicker at the line starts.
            self.stream.write("\x1b[?25l" + "\n".join(lines) + "\n")
            self.stream.flush()
            self._drawn = len(lines)
            return
        if (status.phase != self._last_phase
                or status.elapsed - self._last_plain >= PLAIN_LINE_SECONDS):
            self._last_plain = status.elapsed
            self._last_phase = status.phase
            self._print_plain(status, only_if_new=False)

    def finish(self, status: Status | None) -> None:
        """Leave the last state on screen and give the cursor back."""
        if status is not None:
            if self.live:
                self.update(status)
            else:
                self._print_plain(status, only_if_new=True)
        self._drawn = 0
        if self.live:
            self.stream.write("\x1b[?25h")
            self.stream.flush()

    def _print_plain(self, status: Status, only_if_new: bool) -> None:
        line = self._plain(status)
        # Past the elapsed time at its start, does the line say anything new?
        if not only_if_new or line[8:] != self._last_line[8:]:
            print(line, file=self.stream, flush=True)
        self._last_line = line

    def _erase(self) -> None:
        if self.live and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _paint(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def _state(self, status: Status) -> str:
        state = status.breaker_state or "closed"
        word = self._paint(f" {state.upper().replace('_', '-')} ", f"1;7;{COLORS[state]}")
        refused = f" · {status.breaker_rejected} refused" if status.breaker_rejected else ""
        if state == "open":
            return f"{word} refusing calls, probes in {status.retry_after:.1f}s{refused}"
        if state == "half_open":
            return f"{word} letting probes through{refused}"
        return f"{word} passing calls{refused}"

    def _block(self, s: Status) -> list[str]:
        width = shutil.get_terminal_size((80, 24)).columns
        t = s.tally
        bar_width = max(10, min(40, width - 50))
        done = round(bar_width * t.finished / max(1, t.total))
        full, empty = self.bar_chars
        bar = self._paint(full * done, "32") + empty * (bar_width - done)
        to_come = f" · {t.to_come} to come" if t.to_come else ""
        lines = [
            f"  {s.elapsed:5.1f}s   {self._paint(s.phase.upper(), '1')}  {s.phase_note}",
            f"  breaker   payments.card {self._state(s)}",
            f"  charges   [{bar}]  {t.charged}/{t.total} done",
            f"            {t.deferred} deferred · {t.failed} failed · "
            f"{t.queued + t.running} queued{to_come}",
            f"  provider  {s.provider_calls} calls reached it"
            f"{_by_status(s.provider_by_status)} · {s.outage_calls} during the outage",
        ]
        return [_clip(line, width - 1) for line in lines]

    def _plain(self, s: Status) -> str:
        t = s.tally
        state = s.breaker_state or "closed"
        return (
            f"  {s.elapsed:5.1f}s  {s.phase:<9} breaker {state:<9} "
            f"done {t.charged}/{t.total}  deferred {t.deferred}  failed {t.failed}  "
            f"queued {t.queued + t.running}  "
            + (f"to come {t.to_come}  " if t.to_come else "")
            + f"provider calls {s.provider_calls}"
            f"{_by_status(s.provider_by_status)}"
        )


def _by_status(by_status: dict[str, int]) -> str:
    if not by_status:
        return ""
    return " (" + ", ".join(f"{code}: {n}" for code, n in sorted(by_status.items())) + ")"


def _clip(line: str, width: int) -> str:
    """Cut a line to the terminal width, so it never wraps and spoils the redraw."""
    if len(ANSI.sub("", line)) <= width:
        return line
    return ANSI.sub("", line)[: max(1, width - 1)] + "…"
