"""A flash-sale backlog through a provider outage, on Redis and RabbitMQ brokers.

For each broker (RabbitMQ only where one answers on 127.0.0.1:5672; a vhost of our own), one
prefork worker of payments.charge (2 processes, task events on) and one of the plain Celery
task a user would write (benchmarks/plain_charge.py, the same settings), private
redis-servers and the sandbox provider in a process of its own:

1. throughput: rounds of charges alternating between the two workers, the provider healthy;
2. the outage: CHARGES charges sent while the provider is down (HTTP 503), the provider back
   once every charge was deferred (or after --outage seconds); what holding them costs the
   worker, how fast it defers them, the receptions per charge, and the drain;
3. a long outage (Redis broker): as many open periods as a 10-minute outage has at the default
   30 s timeout, at a shorter timeout; the executions per charge.

Every phase sends its whole batch to a queue the worker does not consume yet, then tells the
worker to consume it (celery control add_consumer), so the sender never competes with the
worker for the CPU while it is timed. Completion is read from the worker's own log lines.

`python -m benchmarks.bench_backlog --help` for the options (the documented 100,000-charge
run of docs/performance.md uses them); `make bench` runs the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime

import redis

from benchmarks.harness import Report, Row, Target
from benchmarks.lab import (
    BrokerKind,
    Lab,
    Worker,
    counts,
    kb,
    lab,
    load,
    mb,
    progress,
    wait_for,
)
from benchmarks.plain_charge import QUEUE as PLAIN_QUEUE
from benchmarks.plain_charge import TASK as PLAIN_TASK
from tests.rabbitmq import unavailable as rabbitmq_unavailable
from workers.parking import INDEX_KEY
from workers.sandbox import SandboxControl

OURS_TASK = "payments.charge"
OURS_QUEUE = "celery"
CONCURRENCY = 2

# The set-up: 6,000 charges, breaker_timeout 5 s.
CHARGES = 6_000
TIMEOUT = 5.0
# Throughput: pairs of rounds, each of about ROUND_SECONDS at the warm-up's pace.
PAIRS = 5
ROUND_SECONDS = 4.0
ROUND_CHARGES = (500, 3_000)
WARM_UP = 300
# The long outage: OPEN_PERIODS timeouts of LONG_TIMEOUT s (a 10-minute outage at 30 s has 20).
OPEN_PERIODS = 20
LONG_TIMEOUT = 1.5
LONG_CHARGES = 2_000

# Goals (issue 8): the breaker's worker against the plain task and against itself.
MEMORY_PER_DEFERRAL_KB = 2.0
MEMORY_BOUND_MB = 64.0  # ... or bounded at this, whatever the backlog
DEFER_SHARE = 0.25  # defer N once in <= N / (4 x steady rate)
DEFERRAL_CPU_SHARE = 0.5
DRAIN_SHARE = 1.1
THROUGHPUT_FLOOR = 0.9
EXECUTIONS_LONG = 3.0


@dataclass
class Steady:
    """One worker's median throughput and worker CPU per charge, the provider healthy."""

    rate: float
    cpu: float
    rates: list[float] = field(default_factory=list)


@dataclass
class Outage:
    """What one outage run measured."""

    task: str
    charges: int
    rss_before: int
    rss_peak: int
    defer_once: float
    deferral_cpu: float
    deferrals_in_phase: int
    receptions: int
    reschedules: int
    already_done: int
    back_after: float
    first_after_back: float
    drain: float
    complete: bool
    statuses: Counter[str]
    charged: int
    charged_twice: int
    deferrals: Counter[int]
    store_memory: int = 0

    @property
    def extra_receptions(self) -> int:
        """Return the receptions that no reschedule explains: redelivered copies."""
        return self.receptions - self.charges - self.reschedules


# --- Sending a batch and watching it --------------------------------------------------------


def batch(lab_: Lab, worker: Worker, task: str, queue: str, order_ids: Sequence[str]) -> list[str]:
    """Send a batch where the worker does not look yet; return its task ids."""
    task_ids = lab_.send(task, order_ids, queue)
    worker.task_of_order.update(zip(order_ids, task_ids, strict=True))
    return task_ids


def done(worker: Worker, task_ids: Sequence[str]) -> int:
    """Return how many of the tasks the worker logged as ended (succeeded or failed)."""
    ended = worker.read_log().ended
    return sum(1 for t in task_ids if t in ended)


def run_round(lab_: Lab, worker: Worker, task: str, queue: str, label: str,
              count: int) -> tuple[float, float]:
    """Time the worker eating a staged batch; return (charges/s, worker CPU s per charge)."""
    task_ids = batch(lab_, worker, task, queue, [f"{label}-{i}" for i in range(count)])
    worker.read_log()
    cpu = worker.cpu()
    started = time.time()
    lab_.consume(worker, queue, on=True)
    wait_for(lambda: done(worker, task_ids) == count, 300 + count / 20, f"{count} {task}s")
    finished = max(worker.counts.ended[t] for t in task_ids)
    cpu = worker.cpu() - cpu
    lab_.consume(worker, queue, on=False)
    return count / (finished - started), cpu / count


def throughput(lab_: Lab, ours: Worker, plain: Worker, report: Report) -> dict[str, Steady]:
    """Rounds alternating ours and plain; return each one's steady figures."""
    workers = {"ours": (ours, OURS_TASK, OURS_QUEUE), "plain": (plain, PLAIN_TASK, PLAIN_QUEUE)}
    warm = {name: run_round(lab_, w, task, queue, f"warm-{name}", WARM_UP)[0]
            for name, (w, task, queue) in workers.items()}
    size = int(min(max(min(warm.values()) * ROUND_SECONDS, ROUND_CHARGES[0]), ROUND_CHARGES[1]))
    progress(f"warm-up: {counts(Counter({k: round(v) for k, v in warm.items()}))} charges/s; "
             f"{2 * PAIRS} rounds of {size:,}")
    rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in workers}
    order = list(workers)
    for pair in range(1, PAIRS + 1):
        for name in order:
            w, task, queue = workers[name]
            rate, cpu = run_round(lab_, w, task, queue, f"r{pair}-{name}", size)
            rounds[name].append((rate, cpu))
            progress(f"round {pair}/{PAIRS} {name:5}: {rate:,.0f} charges/s, worker CPU "
                     f"{cpu * 1e3:.2f} ms per charge; {load()}")
        order.reverse()  # a drift of the machine favours neither
    steady = {name: Steady(statistics.median(r for r, _ in rs), statistics.median(c for _, c in rs),
                           [r for r, _ in rs])
              for name, rs in rounds.items()}
    o, p = steady["ours"], steady["plain"]
    report.table(
        f"[{lab_.broker_kind}] charges through a prefork worker ({CONCURRENCY} processes, task "
        f"events on) against the sandbox: {PAIRS} rounds each of {size:,}, alternating",
        [
            Row("time per charge, median round", 1e6 / o.rate, 1e6 / p.rate, "plain task",
                "us", Target(round(1 / THROUGHPUT_FLOOR, 3))),
            Row("worker CPU per charge (main + pool)", o.cpu * 1e6, p.cpu * 1e6, "plain task",
                "us"),
        ],
        notes=[
            f"charges/s: payments.charge {o.rate:,.0f}, plain task {p.rate:,.0f} = "
            f"{o.rate / p.rate:.3f}x (goal >= {THROUGHPUT_FLOOR}x, i.e. time per charge <= "
            f"{1 / THROUGHPUT_FLOOR:.3f}x)",
            "rounds (charges/s): ours " + ", ".join(f"{r:,.0f}" for r in o.rates)
            + "; plain " + ", ".join(f"{r:,.0f}" for r in p.rates),
        ],
    )
    return steady


# --- The outage -----------------------------------------------------------------------------


def outage(lab_: Lab, worker: Worker, task: str, queue: str, charges: int,
           outage_seconds: float, label: str) -> Outage:
    """Send charges while the provider is down, bring it back, and time the drain."""
    lab_.flush()
    order_ids = [f"{label}-{i}" for i in range(charges)]
    with SandboxControl(lab_.sandbox_url) as sandbox:
        sandbox.reset()
        sandbox.set_faults("down", status=503)
    progress(f"{label}: sending {charges:,} charges, provider down; {load()}")
    task_ids = batch(lab_, worker, task, queue, order_ids)
    ids = set(task_ids)
    log = worker.read_log()
    received_before = sum(log.received[t] for t in ids)
    rss_before, cpu_before = worker.rss(), worker.cpu()
    store_before = _used_memory(lab_.store)
    worker.start_sampling()
    started = time.time()
    lab_.consume(worker, queue, on=True)

    def deferred_once() -> int:
        rescheduled = worker.read_log().rescheduled
        return sum(1 for t in ids if rescheduled[t])

    wait_for(lambda: deferred_once() == charges, 120 + charges / 20,
             f"{charges:,} charges to be deferred once",
             tick=lambda: progress(f"{label}: {deferred_once():,}/{charges:,} deferred once, "
                                   f"worker RSS {mb(worker.rss())}; {load()}"))
    defer_once = time.time() - started
    cpu_deferring = worker.cpu() - cpu_before
    deferrals_in_phase = sum(worker.counts.rescheduled[t] for t in ids)
    store_memory = _used_memory(lab_.store) - store_before
    progress(f"{label}: all {charges:,} deferred once in {defer_once:.1f} s "
             f"({deferrals_in_phase:,} reschedules); worker RSS {mb(worker.rss())}; "
             f"{_parked(lab_.store):,} parked; {load()}")
    if outage_seconds > 0:
        wait_for(lambda: time.time() - started >= outage_seconds, outage_seconds + 10,
                 "the outage to end", every=0.5,
                 tick=lambda: progress(
                     f"{label}: outage {time.time() - started:.0f}/{outage_seconds:g} s, "
                     f"{_parked(lab_.store):,} parked, worker RSS {mb(worker.rss())}; {load()}"))
    with SandboxControl(lab_.sandbox_url) as sandbox:
        sandbox.set_faults("ok")
    back = time.time()
    progress(f"{label}: provider back {back - started:.1f} s after the charges were sent")

    def ended() -> int:
        return done(worker, task_ids)

    complete = True
    try:
        wait_for(lambda: ended() == charges, 600 + charges / 10, f"{charges:,} charges to end",
                 every=0.2, tick=lambda: progress(
                     f"{label}: {ended():,}/{charges:,} done, {_parked(lab_.store):,} parked; "
                     f"{load()}"))
    except RuntimeError as exc:
        progress(f"{label}: {exc}")
        complete = False
    worker.stop_sampling()
    log = worker.read_log()
    times = sorted(log.ended[t] for t in ids if t in log.ended)
    after_back = [t for t in times if t >= back]
    first = after_back[0] if after_back else back
    with SandboxControl(lab_.sandbox_url) as sandbox:
        ledger = sandbox.ledger()
    by_order = Counter({o: n for o, n in ledger["charges_by_order"].items()
                        if o.startswith(f"{label}-")})
    statuses, deferrals = _results(lab_.backend, task_ids)
    return Outage(
        task=task, charges=charges, rss_before=rss_before, rss_peak=worker.peak_rss(),
        defer_once=defer_once, deferral_cpu=cpu_deferring / max(1, deferrals_in_phase),
        deferrals_in_phase=deferrals_in_phase,
        receptions=sum(log.received[t] for t in ids) - received_before,
        reschedules=sum(log.rescheduled[t] for t in ids), already_done=log.already_done,
        back_after=back - started, first_after_back=first - back,
        drain=(times[-1] - first) if after_back else math.nan, complete=complete,
        statuses=statuses, charged=len(by_order),
        charged_twice=sum(1 for n in by_order.values() if n > 1), deferrals=deferrals,
        store_memory=store_memory,
    )


def report_outage(report: Report, kind: BrokerKind, runs: dict[str, Outage],
                  steady: dict[str, Steady], timeout: float) -> None:
    """Print the outage table: our worker's figures against its goals, the plain task's beside."""
    ours = runs.get("ours")
    plain = runs.get("plain")
    rows: list[Row] = []
    notes: list[str] = []
    if ours is not None:
        n, rate, cpu = ours.charges, steady["ours"].rate, steady["ours"].cpu
        rows += [
            Row("worker memory per deferred charge (group RSS, peak)",
                (ours.rss_peak - ours.rss_before) / n / 1024,
                None if plain is None else (plain.rss_peak - plain.rss_before) / n / 1024,
                "plain task", "KB", Target(MEMORY_PER_DEFERRAL_KB, "ours")),
            # The goal is either that row or this one, whatever the backlog.
            Row("  or: worker memory growth, bounded (group RSS, peak)",
                (ours.rss_peak - ours.rss_before) / 2**20,
                None if plain is None else (plain.rss_peak - plain.rss_before) / 2**20,
                "plain task", "MB", Target(MEMORY_BOUND_MB, "ours")),
            Row(f"time to defer the {n:,} once", ours.defer_once, n / rate,
                "N/steady rate", "s", Target(DEFER_SHARE)),
            Row("worker CPU per deferral vs per charge", ours.deferral_cpu * 1e6, cpu * 1e6,
                "charge", "us", Target(DEFERRAL_CPU_SHARE)),
            Row("receptions per charge beyond its own reschedules",
                ours.extra_receptions / n, None if plain is None else plain.extra_receptions / n,
                "plain task", "cmd", Target(0.0, "ours")),
            Row("drain after recovery", ours.drain, n / rate, "N/steady rate", "s",
                Target(DRAIN_SHARE)),
        ]
        notes += _notes("payments.charge", ours, rate)
    if plain is not None:
        notes += _notes("plain task", plain, steady["plain"].rate)
    report.table(
        f"[{kind}] {next(iter(runs.values())).charges:,} charges sent while the provider is down "
        f"(HTTP 503), breaker_timeout {timeout:g} s; the provider back once all were deferred",
        rows, notes)


def _notes(name: str, run: Outage, rate: float | None) -> list[str]:
    n = run.charges
    return [
        f"{name}: worker RSS {mb(run.rss_before)} before, {mb(run.rss_peak)} at the peak "
        f"(+{mb(run.rss_peak - run.rss_before)}); deferred all once in {run.defer_once:.1f} s "
        f"({run.deferrals_in_phase:,} reschedules, {run.deferral_cpu * 1e6:,.0f} µs worker CPU "
        f"each); breaker store +{kb(run.store_memory / n)} per charge while parked",
        f"{name}: {run.receptions / n:.2f} executions per charge ({run.receptions:,} receptions, "
        f"{run.reschedules:,} reschedules, {run.extra_receptions:,} unexplained, "
        f"{run.already_done:,} runs that found the order already charged); deferrals per "
        f"charge {counts(run.deferrals)}",
        f"{name}: provider back {run.back_after:.1f} s after sending; first charge "
        f"{run.first_after_back:.1f} s later; drain {run.drain:.1f} s"
        + ("" if rate is None else f" = {run.drain * rate / n:.2f}x N/steady")
        + f" ({n / run.drain if run.drain else 0:,.0f}/s); "
        f"{'complete' if run.complete else 'NOT complete'}; results {counts(run.statuses)}; "
        f"provider: {run.charged:,} of {n:,} orders charged, {run.charged_twice} twice",
    ]


# --- The long outage ------------------------------------------------------------------------


def long_outage(report: Report, charges: int, timeout: float, periods: int,
                deadline: float | None) -> None:
    """Hold a backlog through periods open periods of timeout s; count executions per charge."""
    settings = {"BREAKER_TIMEOUT": f"{timeout:g}"}
    if deadline:
        settings["PAYMENT_CHARGE_DEADLINE"] = f"{deadline:g}"
    with lab("redis") as lab_, lab_.worker("workers", "bench-long", OURS_QUEUE, settings) as worker:
        progress(f"long outage: {charges:,} charges, breaker_timeout {timeout:g} s, provider "
                 f"down for {periods} open periods ({periods * timeout:g} s); {load()}")
        run = outage(lab_, worker, OURS_TASK, OURS_QUEUE, charges, periods * timeout, "long")
    n = run.charges
    report.table(
        f"[redis] long outage: {n:,} charges through {periods} open periods of {timeout:g} s "
        f"(a {periods * 30 / 60:g}-minute outage at the default 30 s has as many)",
        [Row("executions per charge", run.receptions / n, None, "", "x",
             Target(EXECUTIONS_LONG, "ours"))],
        # No throughput phase here: the drain is given in charges/s, with no steady ratio.
        _notes("payments.charge", run, None),
    )


# --- Helpers --------------------------------------------------------------------------------


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _parked(store: redis.Redis) -> int:
    """Return how many charges are parked now, over every breaker."""
    names = [n.decode() for n in store.smembers(INDEX_KEY)]  # type: ignore[union-attr]
    return sum(int(store.zcard(f"payments:parked:{{{name}}}")) for name in names)


def _results(backend: redis.Redis, task_ids: Sequence[str]) -> tuple[Counter[str], Counter[int]]:
    """Return the backend's states of the tasks, and our results' deferrals per charge."""
    states: Counter[str] = Counter()
    deferrals: Counter[int] = Counter()
    for i in range(0, len(task_ids), 2000):
        keys = [f"celery-task-meta-{t}" for t in task_ids[i:i + 2000]]
        for raw in backend.mget(keys):  # type: ignore[union-attr]
            meta = json.loads(raw) if raw else {}
            states[meta.get("status", "none")] += 1
            result = meta.get("result")
            if isinstance(result, dict) and "deferrals" in result:
                deferrals[int(result["deferrals"])] += 1
    return states, deferrals


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Read the command line; the defaults are what make bench runs."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_backlog",
        description="A flash-sale backlog through a provider outage (make bench runs the "
                    "defaults).",
    )
    parser.add_argument("--charges", type=_positive_int, default=CHARGES,
                        help=f"charges sent while the provider is down (default {CHARGES:,})")
    parser.add_argument("--timeout", type=_positive_float, default=TIMEOUT,
                        help=f"breaker_timeout in seconds (default {TIMEOUT:g})")
    parser.add_argument("--outage", type=_non_negative_float, default=0.0,
                        help="seconds from sending the charges until the provider is back; "
                             "0 (default): as soon as every charge was deferred once")
    parser.add_argument("--deadline", type=_positive_float, default=None,
                        help="payment_charge_deadline in seconds (default: the setting's "
                             "default, 900); a long run needs more")
    parser.add_argument("--brokers", type=_brokers, default=("redis", "amqp"),
                        help="comma-separated: redis, amqp (default both; amqp skips where no "
                             "RabbitMQ answers)")
    parser.add_argument("--sections", type=_sections, default=SECTIONS,
                        help=f"comma-separated, of {', '.join(SECTIONS)} (default all)")
    parser.add_argument("--long-charges", type=_positive_int, default=LONG_CHARGES,
                        help=f"charges in the long outage (default {LONG_CHARGES:,})")
    parser.add_argument("--long-timeout", type=_positive_float, default=LONG_TIMEOUT,
                        help=f"breaker_timeout of the long outage (default {LONG_TIMEOUT:g} s)")
    parser.add_argument("--long-periods", type=_positive_int, default=OPEN_PERIODS,
                        help=f"open periods the long outage lasts (default {OPEN_PERIODS})")
    return parser.parse_args(argv)


SECTIONS = ("throughput", "outage", "plain-outage", "long")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _choices(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(allowed)}")
    return chosen


def _brokers(text: str) -> tuple[str, ...]:
    return _choices(text, ("redis", "amqp"), "broker")


def _sections(text: str) -> tuple[str, ...]:
    return _choices(text, SECTIONS, "section")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the sections for each broker and print their tables (make bench: the defaults)."""
    args = parse([] if argv is None else argv)
    # A SIGTERM (a timeout, CI) unwinds through the with-blocks that stop our processes and
    # delete the RabbitMQ vhost.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> None:
    report = Report()
    settings = {"BREAKER_TIMEOUT": f"{args.timeout:g}"}
    if args.deadline:
        settings["PAYMENT_CHARGE_DEADLINE"] = f"{args.deadline:g}"
    print(f"started {datetime.now().isoformat(timespec='seconds')}; {load()}", flush=True)
    for kind in args.brokers:
        if kind == "amqp" and (why := rabbitmq_unavailable(vhosts=True)) is not None:
            print(f"\n[amqp] skipped: {why}", flush=True)
            continue
        if not {"throughput", "outage", "plain-outage"} & set(args.sections):
            break
        with ExitStack() as stack:
            lab_ = stack.enter_context(lab(kind))  # type: ignore[arg-type]
            ours = stack.enter_context(
                lab_.worker("workers", f"bench-ours-{kind}", OURS_QUEUE, settings))
            plain = stack.enter_context(
                lab_.worker("benchmarks.plain_charge", f"bench-plain-{kind}", PLAIN_QUEUE))
            progress(f"[{kind}] broker {lab_.broker_url.split('@')[-1]}, breaker store "
                     f"{lab_.store_url}, sandbox {lab_.sandbox_url}; workers up; {load()}")
            steady = throughput(lab_, ours, plain, report)
            runs: dict[str, Outage] = {}
            if "outage" in args.sections:
                runs["ours"] = outage(lab_, ours, OURS_TASK, OURS_QUEUE, args.charges,
                                      args.outage, f"{kind}-ours")
            if "plain-outage" in args.sections:
                runs["plain"] = outage(lab_, plain, PLAIN_TASK, PLAIN_QUEUE, args.charges,
                                       args.outage, f"{kind}-plain")
            if runs:
                report_outage(report, kind, runs, steady, args.timeout)
            for worker in (ours, plain):
                for line in worker.errors()[:5]:
                    progress(f"{worker.name} logged: {line[:300]}")
    if "long" in args.sections:
        long_outage(report, args.long_charges, args.long_timeout, args.long_periods,
                    args.deadline)
    report.verdicts()


if __name__ == "__main__":
    main(sys.argv[1:])
