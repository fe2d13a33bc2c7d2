"""The demo's command line: the size of the sale, the outage and the breaker settings."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoOptions:
    """What one run of the demo plays."""

    charges: int = 200
    outage: float = 8.0
    breaker_timeout: float = 3.0
    failure_threshold: int = 3
    success_threshold: int = 2
    half_open_max_calls: int = 2
    concurrency: int = 2
    output: Path = Path("demo-output")
    seed: int | None = None


DEFAULTS = DemoOptions()


def _whole(low: int, high: int) -> Callable[[str], int]:
    """Return an argparse type accepting whole numbers from low to high."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {value}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    """Return an argparse type accepting seconds from low to high, fractions allowed."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a number of seconds, not {text!r}"
            ) from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be from {low:g} to {high:g} seconds, not {text}"
            )
        return value

    return parse


def _seed(text: str) -> int:
    """Parse a random seed for argparse."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of `python -m workers.demo`."""
    d = DEFAULTS
    parser = argparse.ArgumentParser(
        prog="python -m workers.demo",
        description=(
            "Play a flash sale on real parts (a private redis-server, the sandbox provider, a "
            "Celery worker with beat): a burst of charges, a provider outage, the circuit "
            "breaker deferring charges, the recovery. Ends with a proof from the provider's "
            "ledger that every order was charged exactly once, and a timeline PNG."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--charges", metavar="N", type=_whole(1, 5000), default=d.charges,
                        help="orders in the sale")
    parser.add_argument("--outage", metavar="SECONDS", type=_seconds(0.1, 60),
                        default=d.outage, help="seconds the provider is down")
    parser.add_argument("--breaker-timeout", metavar="SECONDS", type=_seconds(0.1, 30),
                        default=d.breaker_timeout,
                        help="seconds the breaker stays open before it lets probes through")
    parser.add_argument("--failure-threshold", metavar="N", type=_whole(1, 100),
                        default=d.failure_threshold,
                        help="consecutive provider failures that open the breaker")
    parser.add_argument("--success-threshold", metavar="N", type=_whole(1, 100),
                        default=d.success_threshold,
                        help="consecutive probe successes that close it again")
    parser.add_argument("--half-open-max-calls", metavar="N", type=_whole(1, 100),
                        default=d.half_open_max_calls, help="probes allowed at once")
    parser.add_argument("--concurrency", metavar="N", type=_whole(1, 32), default=d.concurrency,
                        help="worker processes (prefork pool)")
    parser.add_argument("--output", metavar="DIR", type=Path, default=d.output,
                        help="directory for the timeline PNG, the worker log and the run's files")
    parser.add_argument("--seed", metavar="N", type=_seed, default=None,
                        help="seed for the order amounts (default: a random one, printed)")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> DemoOptions:
    """Return the options of argv, exiting with a usage error naming a bad one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    output: Path = args.output
    if output.exists() and not output.is_dir():
        parser.error(f"--output: {output} exists and is not a directory")
    return DemoOptions(
        charges=args.charges,
        outage=args.outage,
        breaker_timeout=args.breaker_timeout,
        failure_threshold=args.failure_threshold,
        success_threshold=args.success_threshold,
        half_open_max_calls=args.half_open_max_calls,
        concurrency=args.concurrency,
        output=output,
        seed=args.seed,
    )
