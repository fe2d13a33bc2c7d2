"""Run every benchmarks/bench_*.py module's main(), or only the ones named on the command line."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time

import benchmarks

PREFIX = "bench_"


def discover() -> list[str]:
    """Return the names of the benchmark modules, in order."""
    return sorted(
        info.name for info in pkgutil.iter_modules(benchmarks.__path__)
        if info.name.startswith(PREFIX)
    )


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmark modules one after the other."""
    available = discover()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmarks and print their comparison tables.",
    )
    parser.add_argument(
        "modules", nargs="*", metavar="MODULE",
        help=f"benchmark modules to run (default: all): {', '.join(available)}; "
             f"the {PREFIX!r} prefix may be left out",
    )
    args = parser.parse_args(argv)
    selected: list[str] = []
    for name in args.modules:
        module = name if name.startswith(PREFIX) else PREFIX + name
        if module not in available:
            parser.error(
                f"unknown benchmark module {name!r}; available: {', '.join(available) or 'none'}"
            )
        if module not in selected:
            selected.append(module)
    for module in selected or available:
        print(f"=== {module} ===", flush=True)
        started = time.perf_counter()
        importlib.import_module(f"benchmarks.{module}").main()
        print(f"({module} took {time.perf_counter() - started:.1f} s)\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
