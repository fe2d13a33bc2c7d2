"""Benchmarks: each bench_*.py module's main() prints its comparison table (python -m benchmarks).

A benchmark is not a test: it asserts no timing, it reports figures and ratios measured in
one run, and whether each target is met.
"""
