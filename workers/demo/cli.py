"""`python -m workers.demo`: start the parts, play the sale, stop everything, prove the result.

Exit status: 0 when every order was charged exactly once, 1 when not (or a part did not
start), 128 + the signal number when interrupted (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import random
import signal
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import FrameType

from workers.demo.options import DemoOptions, parse_options
from workers.demo.report import audit, plot_timeline, summary_lines
from workers.demo.sale import Sale, SaleRecord
from workers.demo.stack import PRODUCTION_BREAKER_TIMEOUT, SHORTENED, Stack, StartupError
from workers.demo.view import LiveView
from workers.redis_binary import RedisServerNotFound

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The demo was asked to stop by a signal.

    A BaseException, like KeyboardInterrupt, so that no library's `except Exception` retry
    loop swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _already_stopping(signum: int, frame: FrameType | None) -> None:
    """Let the clean-up finish: it is bounded, and cutting it short would leave processes."""


def banner(options: DemoOptions, output: Path) -> list[str]:
    """Return the lines that say what the demo is about to do, and what it shortened."""
    shortened = [
        f"breaker timeout {options.breaker_timeout:g}s (default {PRODUCTION_BREAKER_TIMEOUT}s)",
        *(f"{what} {value}s (default {default}s)" for _, value, default, what in SHORTENED),
    ]
    paragraphs = [
        f"Flash sale: {options.charges} orders charged through a circuit breaker; the payment "
        f"provider goes down for {options.outage:g}s in the middle of it.",
        "Timeouts are shortened so that the demo (with its defaults) ends in under two minutes:",
        "  " + ", ".join(shortened) + ".",
        f"Breaker: opens after {options.failure_threshold} consecutive failures, lets "
        f"{options.half_open_max_calls} probe(s) through at once, closes after "
        f"{options.success_threshold} successful probe(s). Seed {options.seed}.",
        f"Output: {output}",
        "Starting:",
    ]
    return [
        textwrap.fill(text, width=92, subsequent_indent="  ", break_on_hyphens=False)
        for text in paragraphs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and return its exit status."""
    options = parse_options(argv)
    if options.seed is None:
        options = replace(options, seed=random.SystemRandom().randrange(1_000_000))
    output = options.output.resolve()
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"python -m workers.demo: --output: cannot create {output}: {exc}", file=sys.stderr)
        return 2
    for signum in STOP_SIGNALS:
        signal.signal(signum, _interrupt)
    view = LiveView()
    try:
        return _run(options, output, view)
    except Interrupted as exc:
        view.say(f"Interrupted by {exc}.")
        return 128 + exc.signum


def _run(options: DemoOptions, output: Path, view: LiveView) -> int:
    """Start the stack, play the sale, stop the stack, then report; return the exit status."""
    for line in banner(options, output):
        view.say(line)
    stack = Stack(options, output)
    sale: Sale | None = None
    record: SaleRecord | None = None
    stopped_by: Interrupted | None = None
    try:
        stack.start(view.say)
        sale = Sale(options, stack, view)
        stack.record("sale")
        view.say("The sale is open:")
        record = sale.play()
    except Interrupted as exc:
        stopped_by = exc
        view.finish(sale.status if sale else None)
        view.say(f"Interrupted by {exc}.")
    except (StartupError, RedisServerNotFound) as exc:
        view.say(f"The demo could not start: {exc}")
        return 1
    finally:
        for signum in STOP_SIGNALS:
            signal.signal(signum, _already_stopping)
        began = time.monotonic()
        view.say("Stopping the worker (pool and beat), the sandbox provider and redis-server ...")
        try:
            if sale is not None:
                sale.close()
        finally:
            stack.close()
        view.say(f"Stopped everything the demo started in {time.monotonic() - began:.1f}s.")
        for signum in STOP_SIGNALS:
            signal.signal(signum, _interrupt)
    if stopped_by is not None:
        return 128 + stopped_by.signum
    assert record is not None
    return _report(record, output, view)


def _report(record: SaleRecord, output: Path, view: LiveView) -> int:
    """Print and write the summary, draw the timeline; return 0 if all was charged once."""
    result = audit(record)
    picture: Path | None = output / "timeline.png"
    try:
        plot_timeline(record, output / "timeline.png")
    except ImportError:
        view.say("matplotlib is not installed: no timeline picture (pip install matplotlib).")
        picture = None
    lines = summary_lines(record, result, picture)
    (output / "summary.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        view.say(line)
    return 0 if result.ok else 1
